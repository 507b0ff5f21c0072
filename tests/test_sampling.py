"""Sampled GNN training steps (training.sampling): the computation graph, its weights, and the switch."""

from __future__ import annotations

import logging

import numpy as np
import pydantic
import pytest
import torch

from graph.store import GraphConfig
from tests.conftest import RETAIL_II, retail_events
from tests.test_training_parts import _queries, _tiny_store
from training.models import Adjacency, BundleGNN
from training.models.bundle_gnn import CO, IU, UI
from training.protocol import time_split
from training.sampling import cumulative_weights, sample_in_edges
from training.train import Graph, TrainConfig, full_step_gb, step_memory_gb, train


@pytest.fixture(scope="module")
def retail_graph() -> Graph:
    split = time_split(retail_events(RETAIL_II), GraphConfig(), seed=0)
    text = np.random.default_rng(0).normal(size=(split.fit.num_items, 16)).astype(np.float32)
    return Graph.build(split.fit, text, torch.device("cpu"))


def _model(graph: Graph) -> BundleGNN:
    torch.manual_seed(0)
    model = BundleGNN(graph.x.size(1), 16, 2, 0.0, int((graph.id_index >= 0).sum())).eval()
    with torch.no_grad():
        model.gates.fill_(0.7)  # the residual gates start at 0: open them so that neighbours count
    return model


def test_with_every_neighbour_the_seeds_embeddings_equal_the_full_graphs(retail_graph: Graph) -> None:
    model = _model(retail_graph)
    seeds, users = torch.tensor([0, 5, 17, 300, 1200]), torch.tensor([1, 40, 150])
    with torch.no_grad():
        full = retail_graph.embed(model)
        sub, picked = retail_graph.sampled(seeds, users, [10**6, 10**6])
        part = sub.embed(model)
    assert sub.num_items < retail_graph.num_items
    assert torch.equal(picked.items[: len(seeds)], seeds) and torch.equal(picked.users[: len(users)], users)
    for key, kind, ids in (("item", "item", seeds), ("src", "item", seeds), ("dst", "item", seeds),
                           ("user", "user", users)):
        assert torch.allclose(part[key][picked.local(kind, ids)], full[key][ids], atol=1e-5), key
    # with two neighbours per node and relation the embeddings differ, and the subgraph is smaller
    small, _ = retail_graph.sampled(seeds, users, [2, 2])
    assert small.num_items < sub.num_items and small.num_users < sub.num_users


def test_each_sampled_node_has_at_most_fanout_real_in_edges_per_relation(retail_graph: Graph) -> None:
    g = retail_graph
    seeds, users = torch.arange(0, 400, 7), torch.arange(0, 100, 9)
    sub, picked = g.sampled(seeds, users, [3, 2])
    parent = {"item": picked.items, "user": picked.users}
    for rel in (CO, UI, IU):
        src, dst = sub.edge_index[rel]
        assert int(torch.bincount(dst).max()) <= 3  # no target is drawn more than its first-hop fanout
        ids = picked.edges[rel]
        assert torch.equal(parent[rel[0]][src], g.edge_index[rel][0, ids])  # every edge is the parent's edge
        assert torch.equal(parent[rel[2]][dst], g.edge_index[rel][1, ids])
        size = sub.num_items if rel[2] == "item" else sub.num_users
        total = torch.zeros(size).index_add_(0, dst, sub.edge_weight[rel])
        assert torch.allclose(total[total > 0], torch.ones(1))  # weights normalised again over the drawn edges
    # every user in the subgraph has items to take its input from
    assert set(sub.edge_index[IU][1].tolist()) == set(range(sub.num_users))


def test_neighbours_are_drawn_in_proportion_to_their_weight() -> None:
    # target 0 with three sources of weights 0.7, 0.2, 0.1; target 1 with one source
    adj = Adjacency(torch.tensor([[1, 2, 3, 0], [0, 0, 0, 1]]), num_dst=4, num_src=4)
    weight = torch.tensor([0.7, 0.2, 0.1, 1.0])
    cumulative = cumulative_weights(adj, weight)
    torch.manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        edges, w = sample_in_edges(adj, cumulative, weight, torch.tensor([0]), 2)
        assert len(torch.unique(edges)) == len(edges) and float(w.sum()) == 2  # two draws, each edge once
        counts.index_add_(0, edges, w)
    assert torch.allclose(counts / counts.sum(), weight[:3], atol=0.02), counts
    # a target with at most the fanout keeps every edge with its own weight
    edges, w = sample_in_edges(adj, cumulative, weight, torch.tensor([0, 1]), 3)
    assert edges.tolist() == [0, 1, 2, 3] and torch.equal(w, weight)


def test_sampled_training_runs_repeats_and_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(hidden=8, epochs=3, negatives=4, batch_size=4, device="cpu", seed=3, decoder=False,
                      gnn_steps="sampled", fanouts=[1, 1])
    q = _queries([[0], [3]], [2, 4])
    a, b = train(store, text, cfg, val=q, progress=False), train(store, text, cfg, val=q, progress=False)
    assert a.gnn_steps == "sampled" and a.phases["gnn_epochs_sampled"] == 1
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(np.isfinite(r["loss"]) for r in a.history)
    # auto: sampled when a full-graph step's estimate passes the memory allowed, full below it
    graph = Graph.build(store, text, torch.device("cpu"))
    estimate = full_step_gb(graph, cfg)
    with caplog.at_level(logging.INFO, logger="training.train"):
        tight = train(store, text, cfg.model_copy(update={"gnn_steps": "auto", "gnn_memory_gb": estimate / 2}),
                      progress=False)
        roomy = train(store, text, cfg.model_copy(update={"gnn_steps": "auto", "gnn_memory_gb": estimate * 2}),
                      progress=False)
    assert (tight.gnn_steps, roomy.gnn_steps) == ("sampled", "full")
    assert "GNN steps: sampled" in caplog.text and "GNN steps: full" in caplog.text


def test_the_default_step_memory_is_a_quarter_of_ram_and_on_a_gpu_at_most_half_of_its_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import types

    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    assert step_memory_gb(torch.device("cpu")) == pytest.approx(ram_gb / 4)
    for gpu_gb, want in [(ram_gb / 4, ram_gb / 8), (4 * ram_gb, ram_gb / 4)]:  # a small GPU bounds it, a large not
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, gb=gpu_gb: types.SimpleNamespace(total_memory=gb * 1e9))
        assert step_memory_gb(torch.device("cuda")) == pytest.approx(want)


def test_fanouts_need_one_entry_per_layer() -> None:
    assert TrainConfig(layers=3).layer_fanouts == [10, 10, 10]
    with pytest.raises(pydantic.ValidationError, match="one positive entry per layer"):
        TrainConfig(layers=2, fanouts=[10])
    with pytest.raises(pydantic.ValidationError, match="one positive entry per layer"):
        TrainConfig(layers=1, fanouts=[0])
