"""Training building blocks: text encoder, protocol and metrics, baselines, the GNN model."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from graph.events import ItemUpserted, Order, OrderLine
from graph.store import GraphConfig, GraphStore
from tests.conftest import RETAIL_II, at, retail_events
from training import baselines
from training.models import BundleGNN
from training.protocol import Queries, metrics, per_query, rank_queries, ranks, relative_gain, time_split
from training.train import Graph, TrainConfig, score_queries, train


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    from training.encoder import TextEncoder

    return TextEncoder(cache_dir=tmp_path_factory.mktemp("enc"))


def test_encoder_offline_on_real_titles(encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    titles = ["SPACEBOY LUNCH BOX", "DOLLY GIRL LUNCH BOX", "HOT WATER BOTTLE TEA AND SYMPATHY",
              "RETRO SPOT MUG", "SMALL RETRO SPOT MUG IN BOX WHITE"]
    e = encoder.encode(titles, progress=False)
    assert e.shape == (5, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # two lunch boxes vs a hot water bottle
    assert sim[3, 4] > sim[3, 2] + 0.2  # two mugs
    # a second encoder over the same cache encodes nothing and never loads the model
    from training.encoder import TextEncoder

    again = TextEncoder(cache_dir=encoder.cache_path.parent)
    monkeypatch.setattr(again, "_encode_batch", lambda texts: pytest.fail(f"re-encoded {texts}"))
    assert np.array_equal(again.encode(titles, progress=False), e)
    assert again.dim == 384 and "_model" not in vars(again)
    assert again.encode([], progress=False).shape == (0, 384)


def test_the_text_cache_is_shared_by_processes_and_takes_in_an_npz_cache_from_before(tmp_path: Path) -> None:
    """A worker and a retraining share one cache file; a cache written by an earlier version (one .npz rewritten
    at every encode) is read in once and removed."""
    from training.encoder import TextCache

    rng = np.random.default_rng(0)
    old = {f"k{i}": rng.standard_normal(384).astype(np.float32) for i in range(1200)}  # over one SELECT's 500
    np.savez(tmp_path / "enc.npz", keys=np.array(list(old)), vectors=np.stack(list(old.values())))
    worker, job = TextCache(tmp_path / "enc.sqlite"), TextCache(tmp_path / "enc.sqlite")
    assert not (tmp_path / "enc.npz").exists() and len(worker) == len(job) == 1200
    got = job.get([*old, "missing"])
    assert set(got) == set(old) and all(np.array_equal(got[k], v) for k, v in old.items())
    worker.put({"new": np.ones(384, np.float32)})
    assert np.array_equal(job.get(["new"])["new"], np.ones(384, np.float32)) and len(job) == 1201
    memory = TextCache(None)  # an encoder without a cache directory
    memory.put({"a": np.zeros(384, np.float32)})
    assert list(memory.get(["a", "b"])) == ["a"]


def test_encoder_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    from training.encoder import TextEncoder

    with pytest.raises(FileNotFoundError, match="config.json missing"):
        TextEncoder(model_dir=tmp_path)


def _queries(items: list[list[int]], hidden: list[int]) -> Queries:
    n = len(hidden)
    return Queries([np.array(i) for i in items], np.array(hidden), -np.ones(n, np.int64), np.zeros(n, bool))


def test_ranks_and_metrics_by_hand() -> None:
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0], [1.0, 1.0, 1.0, 2.0]])
    q = _queries([[0], [3]], [2, 0])
    # query 0: item 0 masked, hidden item 2 is behind item 1 -> rank 1
    # query 1: item 3 masked, items 0,1,2 tie -> expected rank (0+2)/2 = 1
    r = ranks(scores, q)
    assert r.tolist() == [1.0, 1.0]
    m = metrics(torch.tensor([0.0, 1.0, 12.0, 25.0]), torch.tensor([[0, 1], [1, 2]]), num_items=10)
    assert m["hr@10"] == 0.5 and m["recall@20"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 13 + 1 / 26) / 4)
    assert m["coverage"] == pytest.approx(0.3)


def test_sparse_ranks_equal_the_dense_ranks_of_the_same_scores() -> None:
    """sparse_ranks: unstored items score 0, a query's own items are left out; equal to ranking the dense rows
    (negative, zero, tied and explicit-zero scores; hidden items stored and not; own items stored and not)."""
    import scipy.sparse as sp

    from training.protocol import sparse_ranks

    assert sparse_ranks(sp.csr_matrix(np.array([[0.0, 2.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
                                               np.float32)), _queries([[4], [1]], [0, 3])).tolist() == [1.5, 1.5]
    rng = np.random.default_rng(0)
    n, num = 40, 300
    values = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=(num, n)).astype(np.float32)
    values[rng.random((num, n)) < 0.7] = 0.0
    s = sp.csr_matrix(values)
    s.data[rng.random(s.nnz) < 0.1] = 0.0  # explicit zeros stay stored
    items = [rng.choice(n, rng.integers(1, 6), replace=False) for _ in range(num)]
    hidden = [int(rng.choice(np.setdiff1d(np.arange(n), own))) for own in items]
    q = _queries([list(i) for i in items], hidden)
    want = ranks(torch.from_numpy(s.toarray()), q).numpy()
    assert np.array_equal(sparse_ranks(s, q), want) and len(np.unique(want)) > 10
    assert np.array_equal(rank_queries(lambda qq, a, b: s[a:b], q, n, chunk=64, top=False).rank, want)


def test_relative_gain_and_its_interval_by_hand() -> None:
    each = per_query(torch.tensor([0.0, 1.0, 12.0]))
    assert each["hr@10"].tolist() == [1.0, 1.0, 0.0]
    assert each["ndcg@10"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0])
    hits = np.array([1.0, 0.0, 1.0, 0.0])
    same = relative_gain([hits], [hits])
    assert same == {"gain": 0.0, "low": 0.0, "high": 0.0, "runs": [0.0]}  # paired draws never differ
    # twice the hits on every draw that has any: the gain is +100 % and so is the whole interval
    double = relative_gain([2 * hits, 2 * hits], [hits, hits])
    assert double["gain"] == pytest.approx(1.0) and double["low"] == pytest.approx(1.0) == double["high"]
    assert double["runs"] == [1.0, 1.0]
    # one seed +100 %, the other 0: +50 % pooled, but seeds are resampled too, so the interval
    # reaches from the draws of the second seed twice (0) to those of the first twice (+100 %)
    half = np.r_[np.ones(50), np.zeros(50)]
    split_seeds = relative_gain([2 * half, half], [half, half])
    assert split_seeds["gain"] == pytest.approx(0.5) and split_seeds["runs"] == [1.0, 0.0]
    assert split_seeds["low"] == pytest.approx(0.0) and split_seeds["high"] == pytest.approx(1.0)
    # one run: a hits 60 of 100 queries, b 50 of those same queries -> +20 %, interval above 0
    a, b = np.r_[np.ones(60), np.zeros(40)], np.r_[np.ones(50), np.zeros(50)]
    gain = relative_gain([a], [b], seed=1)
    assert gain["gain"] == pytest.approx(0.2) and 0 < gain["low"] < 0.2 < gain["high"]
    assert relative_gain([a], [b], seed=1) == gain  # seeded
    # near-equal totals at unrelated positions: the interval spans 0
    rng = np.random.default_rng(0)
    noisy = relative_gain([rng.permutation(a)], [rng.permutation(np.r_[np.ones(58), np.zeros(42)])])
    assert noisy["low"] < 0 < noisy["high"]
    with pytest.raises(ValueError, match="same runs"):
        relative_gain([a], [b[:10]])
    # b scores on 2 queries of 100: many draws miss both, an unbounded gain; the upper bound says +inf, not nan
    rare = relative_gain([np.r_[np.ones(30), np.zeros(70)]], [np.r_[np.ones(2), np.zeros(98)]])
    assert rare["gain"] == pytest.approx(14.0) and rare["high"] == math.inf and 0 < rare["low"] < 14


def _tiny_store() -> GraphStore:
    store = GraphStore(GraphConfig())
    titles = ["red mug", "blue mug", "tea towel", "lunch box", "bottle"]
    for k, t in enumerate(titles):
        store.apply(ItemUpserted(item_id=f"i{k}", title=t, price=k + 1.0, ts=at(0)))
    baskets = [[0, 2], [0, 2, 3], [1, 2], [3, 4], [0, 2], [3, 4, 1]]
    for n, b in enumerate(baskets):
        store.apply(Order(order_id=f"o{n}", user_id=f"u{n % 2}", items=[OrderLine(item_id=f"i{i}") for i in b], ts=at(n)))
    return store


def test_baselines_on_a_tiny_store() -> None:
    store = _tiny_store()
    q = Queries([np.array([0]), np.array([3, 4])], np.array([2, 1]), np.array([0, -1]), np.zeros(2, bool))
    pop = baselines.popularity(store)(q, 0, 2)
    assert pop.shape == (2, 5) and pop[1].tolist() == [3.0, 2.0, 4.0, 3.0, 2.0]
    co = baselines.cooccurrence(store)(q, 0, 2)
    assert co[0, 2] == pytest.approx(3 / math.sqrt(3 * 4)) and co[0, 0] == 0  # mug -> tea towel: cosine
    b = baselines.ease(store, lam=1.0)(q, 0, 1)
    assert int(b[0].argmax()) == 2  # mug -> tea towel, its most frequent partner
    history = baselines.user_history(store)(q, 0, 2)
    bought = {int(i) for i in np.flatnonzero(store.user_item_matrix().toarray()[0])}
    assert {int(i) for i in torch.topk(history[0], len(bought)).indices} == bought  # user u0's own items first
    assert int(history[1].argmax()) == 2  # no user: popularity breaks the tie
    text = baselines.text_similarity(np.eye(5, dtype=np.float32))(q, 0, 2)
    assert text[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0] and text[1, 3] == text[1, 4] == 0.5


@pytest.mark.skipif(not baselines.sansa_installed(), reason="the sansa peer is installed by `make bench` "
                    "(it needs SuiteSparse), not by `make test`")
def test_sansa_comes_near_ease_on_real_orders_and_never_predicts_an_item_without_orders() -> None:
    split = time_split(retail_events(), GraphConfig(), seed=0)
    n = split.train.num_items
    got = {name: rank_queries(score, split.test, n).metrics(n)["hr@10"]
           for name, score in (("sansa", baselines.sansa(split.train, l2=20.0)),
                               ("ease", baselines.ease(split.train, 50.0)),
                               ("cooccurrence", baselines.cooccurrence(split.train)))}
    assert got["sansa"] >= 0.85 * got["ease"] and got["sansa"] >= got["cooccurrence"], got
    never = np.flatnonzero(split.train.item_order_counts() == 0)
    assert len(never) and float(baselines.sansa(split.train)(split.test, 0, 4)[:, never].max()) < -1e29


def test_model_shapes_gradients_and_an_unseen_item() -> None:
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))  # no edges at all
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    graph = Graph.build(store, text, torch.device("cpu"))
    model = BundleGNN(graph.x.size(1), hidden_channels=8, num_layers=2)
    h = graph.embed(model)
    assert h["item"].shape == (6, 8) and h["user"].shape == (2, 8) and h["src"].shape == (6, 8)
    assert torch.isfinite(h["src"][5]).all() and torch.isfinite(h["dst"][5]).all()
    assert int(graph.id_index[5]) == -1 and int(graph.id_index[:5].min()) >= 0  # the new item has no ID row
    q = torch.zeros(2, 6)
    q[0, 0] = q[1, [3, 4]] = 1.0
    scores = model.complement_scores(h, q)
    assert torch.allclose(scores, model.complement_scores(h, q.to_sparse()), atol=1e-6)  # baskets as sparse rows
    assert scores.shape == (2, 6) and torch.isfinite(scores).all()
    ab = model.complement_scores(h, torch.eye(6))
    assert not torch.allclose(ab, ab.T)  # complementarity is asymmetric
    assert model.user_scores(h, torch.tensor([0, 1])).shape == (2, 6)
    (scores.sum() + model.user_scores(h, torch.tensor([1])).sum()).backward()
    assert all(p.grad is not None for p in model.item_in.parameters())
    assert model.gates.grad is not None  # the message-passing gates are trained


def test_a_basket_view_is_pooled_in_fp32_under_bf16_autocast() -> None:
    """CUDA has no bf16 kernel for sparse @ dense (found on an H200): the pooling leaves autocast, on every device."""
    from training.models.bundle_gnn import BundleGNN
    from training.train import autocast

    query = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [0, 2, 1]]), torch.tensor([0.5, 0.5, 1.0]), (2, 3))
    src = torch.tensor([[1.0, 2.0], [3.0, 1 / 3], [1 + 2**-10, 0.0]])
    with autocast("bf16", torch.device("cpu")):
        pooled = BundleGNN.pool(query, src)
        assert (query @ src).dtype == torch.bfloat16  # what autocast would have done
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, torch.tensor([[(2 + 2**-10) / 2, 1.0], [3.0, 1 / 3]]))


def test_message_passing_and_its_gradient_equal_the_dense_products() -> None:
    """A relation's :class:`Propagation` multiplies by its weighted adjacency, and its backward by the cached
    transpose: the same values and input gradients as dense matrices (repeated edges in either direction,
    a target without edges, a source without edges), whether the edges come in the transpose's CSR order,
    in the adjacency's own (no copy of the order kept) or in neither. The transpose is built only for a
    gradient."""
    from training.models import Adjacency

    rng = np.random.default_rng(4)
    src, dst = rng.integers(0, 7, 40), rng.integers(0, 5, 40)
    pairs = np.unique(np.stack([src, dst]), axis=1)  # sorted by source: the transpose's CSR order
    pairs = pairs[:, (pairs[1] != 3) & (pairs[0] != 6)]
    by_source, by_target = np.arange(pairs.shape[1]), np.lexsort((pairs[0], pairs[1]))
    for order in (by_source, by_target, rng.permutation(pairs.shape[1])):
        edges = pairs[:, order]
        w = torch.from_numpy(rng.random(edges.shape[1]))
        a = torch.zeros(5, 7, dtype=torch.float64)
        a[edges[1], edges[0]] = w
        x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        adj = Adjacency(torch.from_numpy(edges), 5, 7)
        assert (adj.csr.order is None) == (order is by_target)
        with torch.no_grad():
            assert torch.allclose(adj(w)(x), a @ x)
        assert "csr_t" not in adj.__dict__  # nothing asked for a gradient yet
        out = adj(w)(x)
        grad = torch.randn(5, 3, dtype=torch.float64)
        out.backward(grad)
        assert torch.allclose(out.detach(), a @ x.detach()) and torch.allclose(x.grad, a.T @ grad)
        assert (adj.csr_t.order is None) == (order is by_source)
        assert float(out.detach()[3].abs().sum()) == 0 and float(x.grad[6].abs().sum()) == 0
    with pytest.raises(ValueError, match="duplicate edges"):
        Adjacency(torch.tensor([[0, 0], [1, 1]]), 2, 2)


def test_training_runs_and_is_deterministic_under_a_seed() -> None:
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(hidden=8, epochs=3, negatives=4, batch_size=4, device="cpu", seed=3)
    q = _queries([[0], [3]], [2, 4])
    a, b = train(store, text, cfg, val=q, progress=False), train(store, text, cfg, val=q, progress=False)
    assert len(a.history) == 3 and all(math.isfinite(r["loss"]) for r in a.history)
    graph = Graph.build(store, text, torch.device("cpu"))
    assert torch.equal(score_queries(a.model, graph, q), score_queries(b.model, graph, q))


def test_gnn_epochs_stop_at_their_time_budget_and_keep_the_best_epoch(caplog: pytest.LogCaptureFixture) -> None:
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(hidden=8, epochs=50, patience=50, negatives=4, batch_size=4, device="cpu", gnn_budget_s=1e-6)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        result = train(store, text, cfg, val=_queries([[0], [3]], [2, 4]), progress=False)
    assert len(result.history) == 1 and result.best_epoch == 1
    assert result.phases["gnn_epochs_stopped_by_budget"] == 1 and "over training.gnn_budget_s" in caplog.text
    unlimited = train(store, text, cfg.model_copy(update={"gnn_budget_s": None, "epochs": 3}), progress=False)
    assert len(unlimited.history) == 3 and unlimited.phases["gnn_epochs_stopped_by_budget"] == 0


def test_training_on_real_data_repeats_to_the_last_digit() -> None:
    """Two runs of one seed give the same losses exactly (multi-threaded kernels once made them drift)."""
    split = time_split(retail_events(RETAIL_II), GraphConfig(), seed=0)
    text = np.random.default_rng(0).normal(size=(split.fit.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(epochs=1, device="cpu", decoder=False)
    a, b = (train(split.fit, text, cfg, val=split.val, progress=False) for _ in range(2))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_a_cut_never_splits_the_orders_of_one_time() -> None:
    from training.protocol import _between_times

    times = [1.0, 2.0, 2.0, 2.0, 3.0]
    assert [_between_times(times, k) for k in range(6)] == [0, 1, 1, 1, 4, 5]  # back to the first order of its time
    assert _between_times([1.0, 1.0, 1.0, 2.0], 2) == 3  # the first time: past its last order instead
    assert _between_times([1.0, 1.0, 1.0], 1) == 1  # one time only: nothing to move to


def test_time_split_on_real_data_is_deterministic() -> None:
    events = retail_events(RETAIL_II)
    a, b = time_split(events, GraphConfig(), seed=7), time_split(events, GraphConfig(), seed=7)
    assert a.protocol == b.protocol and np.array_equal(a.test.hidden, b.test.hidden)
    assert a.protocol["test_queries"] == 256 and a.protocol["cold_start_test_queries"] > 0
    c = time_split(events, GraphConfig(), seed=8)
    assert not np.array_equal(a.test.hidden, c.test.hidden)
    # the test store knows every item (text) but test-period items have no orders
    counts = a.train.item_order_counts()
    assert (counts[a.test.hidden[a.test.cold]] == 0).all()
    assert a.fit.stats.orders_placed < a.train.stats.orders_placed


def test_a_split_without_its_train_store_holds_one_store_and_the_job_builds_the_full_one_after_releasing_it() -> None:
    """``train`` without a window: the fit store alone during training, then the store of every event, built
    afresh once the fit store is released; the same stores as a split that builds both."""
    from training.job import Candidate, full_store

    events = retail_events(RETAIL_II)
    both = time_split(events, GraphConfig(), seed=0, test_frac=0.0)
    one = time_split(events, GraphConfig(), seed=0, test_frac=0.0, with_train=False)
    assert one.train is None and one.fit.co_edges()[2].tolist() == both.fit.co_edges()[2].tolist()
    assert one.protocol["val_queries"] == both.protocol["val_queries"]
    assert np.array_equal(one.val.hidden, both.val.hidden)
    with pytest.raises(ValueError, match="with_train=False needs test_frac=0"):
        time_split(events, GraphConfig(), seed=0, test_frac=0.2, with_train=False)
    cand = Candidate(result=None, split=one, id_items=[], text_train=None, seconds=0.0)  # type: ignore[arg-type]
    store = full_store(cand, events, GraphConfig())
    assert cand.split.fit is None  # released before the full store was built
    assert store.items.ids == both.train.items.ids and store.stats.as_dict() == both.train.stats.as_dict()
    assert store.co_edges()[2].tolist() == both.train.co_edges()[2].tolist()


def test_leave_items_out_split_hides_items_from_training_entirely() -> None:
    events = retail_events(RETAIL_II)
    plain = time_split(events, GraphConfig(), seed=7)
    a, b = (time_split(events, GraphConfig(), seed=7, held_out=0.1) for _ in range(2))
    assert a.held_out == b.held_out and np.array_equal(a.test.hidden, b.test.hidden)  # seeded
    assert len(a.held_out) == a.protocol["held_out_items"] == round(0.1 * len(a.train.items.ids))
    held_rows = [a.train.items.index[i] for i in a.held_out]
    assert (a.train.item_order_counts()[held_rows] == 0).all()  # no training order holds one ...
    assert all(i in a.fit.items for i in a.held_out)  # ... but the catalog knows their text
    assert a.train.stats.orders_placed <= plain.train.stats.orders_placed
    held = a.held_out_queries()
    assert held.sum() == a.protocol["held_out_test_queries"] > plain.protocol["cold_start_test_queries"]
    assert a.test.cold[held].all() and len(a.test) == len(plain.test)  # the same test baskets
    ids = a.train.items.ids
    for rows, hidden, is_held in zip(a.test.items, a.test.hidden, held):  # a basket with a held item hides one
        assert is_held or not any(ids[r] in a.held_out for r in rows)


def test_training_view_makes_items_look_new() -> None:
    from graph.export import CO, UI

    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    graph = Graph.build(store, text, torch.device("cpu"))
    torch.manual_seed(0)
    weight, ids = graph.training_view(drop_edge=0.0, cold=0.5)
    cold = ids < 0
    assert 0 < int(cold.sum()) < store.num_items
    co = graph.edge_index[CO]
    touches_cold = cold[co[0]] | cold[co[1]]
    assert bool((weight[CO][touches_cold] == 0).all()) and bool((weight[CO][~touches_cold] > 0).all())
    assert bool((weight[UI][cold[graph.edge_index[UI][1]]] == 0).all())
    full, all_ids = graph.training_view(drop_edge=0.0, cold=0.0)
    assert torch.equal(all_ids, graph.id_index) and torch.allclose(full[CO], graph.edge_weight[CO])


def test_bf16_scoring_heads_train_close_to_fp32() -> None:
    """The mixed-precision path (bf16 autocast of the scoring heads) runs on CPU too and stays close to fp32."""
    from training.train import autocast

    assert not autocast("auto", torch.device("cpu"))._enabled  # fp32 on CPU unless asked
    assert autocast("bf16", torch.device("cpu"))._enabled and not autocast("fp32", torch.device("cpu"))._enabled
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    base = TrainConfig(hidden=8, epochs=3, negatives=4, batch_size=4, device="cpu", seed=3)
    fp32 = train(store, text, base, progress=False)
    bf16 = train(store, text, base.model_copy(update={"precision": "bf16"}), progress=False)
    losses = [(a["loss"], b["loss"]) for a, b in zip(fp32.history, bf16.history)]
    assert all(math.isfinite(b) and abs(a - b) < 0.05 * abs(a) for a, b in losses), losses
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32


def test_the_user_term_adds_a_known_user_s_history_only() -> None:
    """pipeline_scores: ``base + w · history`` for a query with a known user; unknown users (-1) get the base."""
    from training.train import pipeline_scores, user_history

    store = _tiny_store()
    graph = Graph.build(store, np.zeros((store.num_items, 4), np.float32), torch.device("cpu"))
    base = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    q = Queries([np.array([0]), np.array([3])], np.array([2, 4]), np.array([1, -1]), np.zeros(2, bool))
    got = pipeline_scores(lambda qq, a, b: base[a:b], graph, 0.5)(q, 0, 2)
    history = user_history(store).toarray()
    assert history[1].max() == pytest.approx(1.0) and (history[1] > 0).sum() == 5  # u1 bought i0..i4
    assert torch.allclose(got[0], base[0] + 0.5 * torch.from_numpy(history[1]))
    assert torch.equal(got[1], base[1]) and torch.equal(base, torch.arange(10.0).reshape(2, 5))  # base untouched


def test_the_gnn_user_head_adds_standardised_scores_scaled_to_the_base_spread_for_known_users_only() -> None:
    """UserHead: ``base + w · std(base) · z(user_scores)`` per known user, by hand from the model's own head;
    an unknown user (-1) gets the base; weight 0 returns the base scorer itself."""
    from training.train import UserHead, pipeline_scores

    store = _tiny_store()
    graph = Graph.build(store, np.random.default_rng(0).normal(size=(store.num_items, 4)).astype(np.float32),
                        torch.device("cpu"))
    torch.manual_seed(0)
    head = UserHead.of(BundleGNN(graph.x.size(1), 8, 1), graph)
    base = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 0.0, 0.0, 1.0, 0.0, 0.0]])[:, : store.num_items]
    q = Queries([np.array([0]), np.array([3])], np.array([2, 4]), np.array([-1, 1]), np.zeros(2, bool))
    got = pipeline_scores(lambda qq, a, b: base[a:b], graph, 0.0, head, 0.5)(q, 0, 2)
    with torch.no_grad():
        u = head.model.user_scores(head.h, torch.tensor([1]))[0]
    z = (u - u.mean()) / u.std()
    assert z.abs().max() > 0.1  # the head tells items apart
    assert torch.equal(got[0], base[0])
    assert torch.allclose(got[1], base[1] + 0.5 * base[1].std() * z, atol=1e-6)
    assert torch.equal(base[1, :2], torch.tensor([5.0, 0.0]))  # the base itself is untouched
    plain = lambda qq, a, b: base[a:b]  # noqa: E731
    assert pipeline_scores(plain, graph, 0.0, head, 0.0) is plain and pipeline_scores(plain, graph, 0.0, None, 1.0) is plain


def test_a_weight_grid_is_ranked_in_one_pass_with_the_same_scores_as_one_weight_at_a_time() -> None:
    """tune_weight ranks every weight of a grid chunk by chunk: the base scorer (behind last_chunk) runs once a
    chunk, the head's user scores once a chunk, and each weight's NDCG@10 equals ranking it alone."""
    from training.train import UserHead, last_chunk, ndcg, pipeline_scores, tune_weight

    store = _tiny_store()
    n = store.num_items
    graph = Graph.build(store, np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), torch.device("cpu"))
    torch.manual_seed(0)
    head = UserHead.of(BundleGNN(graph.x.size(1), 8, 1), graph)
    rng = np.random.default_rng(1)
    num = 1100  # three chunks of 512
    base = torch.from_numpy(rng.normal(size=(num, n)).astype(np.float32))
    q = Queries([np.array([r % n]) for r in range(num)], np.array([(r + 1) % n for r in range(num)]),
                rng.integers(-1, graph.num_users, num), np.zeros(num, bool))
    calls: list[tuple[int, int]] = []

    def counted(qq: Queries, a: int, b: int) -> torch.Tensor:
        calls.append((a, b))
        return base[a:b]

    user_scores = head.model.user_scores
    head_calls: list[int] = []
    head.model.user_scores = lambda h, users: (head_calls.append(len(users)), user_scores(h, users))[1]  # type: ignore[method-assign]
    shared = last_chunk(counted)
    grid = [0.0, 0.05, 0.5, 2.0]
    got = tune_weight(lambda w: pipeline_scores(shared, graph, 0.2, head, w), grid, q, n)
    assert calls == [(0, 512), (512, 1024), (1024, 1100)] and len(head_calls) == 3
    alone = {w: ndcg(pipeline_scores(lambda qq, a, b: base[a:b], graph, 0.2, head, w), q, n) for w in grid}
    assert got == alone and len(set(got.values())) > 1
    assert tune_weight(lambda w: pipeline_scores(shared, graph, 0.2, head, w), grid, q, n, without=0.123)[0.0] == 0.123


def test_training_keeps_an_answer_whose_item_the_catalog_updated_after_the_last_order() -> None:
    """With every known item as a negative (a small catalog), an item re-listed after the last order is not a
    negative, but it is still an answer of the orders that hold it: it stays among the candidates."""
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="i2", title="tea towel, new photo", price=3.0, ts=at(30)))
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    result = train(store, text, TrainConfig(epochs=1, hidden=8, decoder=False, batch_size=4, examples_per_epoch=8),
                   progress=False)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
