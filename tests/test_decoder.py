"""The closed-form decoder: EASE^R without side information, text and GNN embeddings reaching items without orders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graph.events import ItemUpserted
from tests.conftest import at
from tests.test_training_parts import _queries, _tiny_store
from training import baselines
from training.models import DecoderConfig, decoder_weights, side_view, top_rows
from training.train import Graph, TrainConfig, decoder_matrix, score_queries, train


def test_without_side_information_it_is_ease() -> None:
    store = _tiny_store()
    b = decoder_weights(baselines.basket_matrix(store), [], lam=2.0)
    assert torch.allclose(b, baselines.ease(store, 2.0)[0], atol=1e-6)
    assert torch.all(torch.diagonal(b) == 0)


def test_text_reaches_an_item_without_orders_and_weights_are_asymmetric() -> None:
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))  # text only, no orders
    x = baselines.basket_matrix(store)
    text = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    text[5] = text[0] + 0.1 * text[5]  # the new item reads like the red mug
    plain = decoder_weights(x, [], lam=1.0)
    assert torch.all(plain[:, 5] == 0) and torch.all(plain[5] == 0)  # EASE^R cannot score it
    b = decoder_weights(x, [(5.0, side_view(text))], lam=1.0)
    assert int(b[0].argmax()) == 5 and float(b[0, 5]) > 0.3  # a basket with the red mug ranks the new mug first
    assert int(b[5].argmax()) == 0
    assert not torch.allclose(b, b.T)


def test_items_without_orders_get_text_weight_towards_them() -> None:
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))
    x = baselines.basket_matrix(store)
    text = side_view(np.random.default_rng(0).normal(size=(6, 16)))
    sides = [(5.0, text)]
    plain = decoder_weights(x, sides, lam=1.0)
    b = decoder_weights(x, sides, lam=1.0, cold=(0.5, text))
    cos = (text @ text.T).clamp(min=0).float()
    expect = plain[:, 5] + 0.5 * cos[:, 5]
    expect[5] = 0
    assert torch.allclose(b[:, 5], expect, atol=1e-6)  # only the column of the item without orders moves
    assert torch.equal(b[:, :5], plain[:, :5]) and float(b[5, 5]) == 0


def test_side_view_centres_and_scales() -> None:
    e = np.array([[3.0, 1.0], [1.0, 1.0], [2.0, 4.0]])
    v = side_view(e)
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(side_view(e * 7 + 1), v)  # a shared offset and scale change nothing


def test_top_rows_best_first() -> None:
    w = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, -1.0, 4.0]])
    index, weight = top_rows(w, 2)
    assert index.tolist() == [[1, 3], [0, 3]] and weight.tolist() == [[3.0, 2.0], [5.0, 4.0]]
    assert index.dtype == np.int32 and top_rows(w, 10)[0].shape == (2, 3)


def test_training_picks_the_decoder_on_validation_and_scores_through_it() -> None:
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(hidden=8, epochs=2, negatives=4, batch_size=4, device="cpu", decoder_lambdas=[1.0, 10.0],
                      decoder_text_weights=[0.0, 5.0], decoder_gnn_weights=[0.0, 5.0])
    q = _queries([[0], [3]], [2, 4])
    result = train(store, text, cfg, val=q, progress=False)
    assert len(result.decoder_val) == 8 and result.decoder == max(result.decoder_val, key=result.decoder_val.get)
    graph = Graph.build(store, text, torch.device("cpu"))
    scores = score_queries(result.model, graph, q, result.decoder)
    assert torch.allclose(scores, q.matrix(5) @ decoder_matrix(result.model, graph, result.decoder))
    assert not torch.allclose(scores, score_queries(result.model, graph, q))  # not the cosine head
    off = train(store, text, cfg.model_copy(update={"decoder": False}), val=q, progress=False)
    assert off.decoder is None and off.decoder_val == {}
    small = train(store, text, cfg.model_copy(update={"decoder_max_items": 4}), val=q, progress=False)
    assert small.decoder is None  # too many items for a dense inversion: the cosine head


@pytest.mark.parametrize("cfg", [DecoderConfig(lam=3.0, text_weight=2.0, gnn_weight=0.0),
                                 DecoderConfig(lam=3.0, text_weight=2.0, gnn_weight=0.0, cold_weight=0.5)])
def test_text_ease_baseline_is_the_decoder_without_the_gnn(cfg: DecoderConfig) -> None:
    store = _tiny_store()
    text = np.random.default_rng(1).normal(size=(store.num_items, 16)).astype(np.float32)
    b, _ = baselines.text_ease(store, text, cfg.lam, cfg.text_weight, cfg.cold_weight)
    graph = Graph.build(store, text, torch.device("cpu"))
    from training.models import BundleGNN

    model = BundleGNN(graph.x.size(1), hidden_channels=8)
    assert torch.allclose(b, decoder_matrix(model, graph, cfg), atol=1e-5)  # gnn_weight 0: the model plays no part
