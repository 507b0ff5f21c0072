"""The closed-form decoder: EASE^R without side information, text and GNN embeddings reaching items without orders,
and the neighbourhood fit that equals the dense one when neighbourhoods hold every item."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from graph.events import ItemUpserted
from tests.conftest import at
from tests.test_training_parts import _queries, _tiny_store
from training import baselines
from training.models import DecoderConfig, decoder_weights, fit_decoder, fit_decoders, neighbourhood_weights, side_view, top_rows
from training.train import Graph, TrainConfig, decoder_for, score_queries, side_views, train


def _gram(store) -> sp.csr_matrix:
    x = baselines.basket_matrix(store)
    return (x.T @ x).tocsr()


def test_without_side_information_it_is_ease() -> None:
    store = _tiny_store()
    x = baselines.basket_matrix(store).toarray()
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(5))
    ease = -p / np.diag(p)[None, :]
    np.fill_diagonal(ease, 0.0)
    b = decoder_weights(_gram(store), [], lam=2.0)
    assert torch.allclose(b, torch.from_numpy(ease).float(), atol=1e-6)
    assert torch.all(torch.diagonal(b) == 0)
    # the store's co-purchase counts are the same Gram matrix
    assert np.allclose(baselines.item_gram(store).toarray(), x.T @ x)


def test_text_reaches_an_item_without_orders_and_weights_are_asymmetric() -> None:
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))  # text only, no orders
    g = _gram(store)
    text = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    text[5] = text[0] + 0.1 * text[5]  # the new item reads like the red mug
    plain = decoder_weights(g, [], lam=1.0)
    assert torch.all(plain[:, 5] == 0) and torch.all(plain[5] == 0)  # EASE^R cannot score it
    b = decoder_weights(g, [(5.0, side_view(text))], lam=1.0)
    assert int(b[0].argmax()) == 5 and float(b[0, 5]) > 0.3  # a basket with the red mug ranks the new mug first
    assert int(b[5].argmax()) == 0
    assert not torch.allclose(b, b.T)


def test_items_without_orders_get_text_weight_towards_them() -> None:
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))
    g = _gram(store)
    text = side_view(np.random.default_rng(0).normal(size=(6, 16)))
    sides = [(5.0, text)]
    plain = decoder_weights(g, sides, lam=1.0)
    b = decoder_weights(g, sides, lam=1.0, cold=(0.5, text))
    cos = (text @ text.T).clamp(min=0).float()
    expect = plain[:, 5] + 0.5 * cos[:, 5]
    expect[5] = 0
    assert torch.allclose(b[:, 5], expect, atol=1e-6)  # only the column of the item without orders moves
    assert torch.equal(b[:, :5], plain[:, :5]) and float(b[5, 5]) == 0


def test_a_neighbourhood_holding_every_item_gives_the_dense_weights() -> None:
    """Each column of EASE^R is the ridge regression of that item on all others (a Schur complement):
    restricted to a neighbourhood of every item (here the side neighbours reach all of them), the sparse
    fit is the dense one."""
    store = _tiny_store()
    store.apply(ItemUpserted(item_id="new", title="green mug", ts=at(9)))
    g = baselines.item_gram(store)
    rng = np.random.default_rng(2)
    text, other = side_view(rng.normal(size=(6, 8))), side_view(rng.normal(size=(6, 8)))
    sides = [("text", 3.0, text), ("gnn", 2.0, other)]
    dense = decoder_weights(g, [(a, v) for _, a, v in sides], lam=1.5, cold=(0.2, text))
    sparse = neighbourhood_weights(g, [(n, a, v.numpy()) for n, a, v in sides], lam=1.5, cold=(0.2, "text"),
                                   k_co=10, k_side=10)
    assert sp.issparse(sparse) and np.allclose(sparse.toarray(), dense.numpy(), atol=1e-5)
    cfg = DecoderConfig(lam=1.5, text_weight=3.0, cold_weight=0.2, method="neighbourhood", k_co=10, k_side=10)
    fitted = fit_decoder(g, [(n, v) for n, _, v in sides], cfg)
    assert fitted.config.method == "neighbourhood" and sp.issparse(fitted.weights)
    # a grid in one pass gives each point's own fit
    grid = [cfg, cfg.model_copy(update={"lam": 4.0, "gnn_weight": 2.0})]
    together = list(fit_decoders(g, [(n, v) for n, _, v in sides], grid))
    assert [d.config for d in together] == grid
    assert np.allclose(together[0].weights.toarray(), fitted.weights.toarray())
    alone = fit_decoder(g, [(n, v) for n, _, v in sides], grid[1])
    assert np.allclose(together[1].weights.toarray(), alone.weights.toarray())
    assert not np.allclose(together[1].weights.toarray(), fitted.weights.toarray())


def test_small_neighbourhoods_rank_held_out_orders_as_well_as_the_dense_fit() -> None:
    """On a time split of real orders, a fit on each item's 32 closest co-purchase partners ranks the test orders'
    hidden items within 5 % of the dense inversion (measured: a little better, since it drops noisy
    indirect weights), with at most 32 weights per column."""
    from tests.conftest import RETAIL_II, retail_events
    from graph.store import GraphConfig
    from training.protocol import evaluate_scores, time_split

    split = time_split(retail_events(RETAIL_II), GraphConfig(), seed=0)
    g = baselines.item_gram(split.train)
    n = g.shape[0]
    q = split.test.matrix(n)
    dense = evaluate_scores(q @ decoder_weights(g, [], lam=50.0), split.test, n)
    weights = neighbourhood_weights(g, [], lam=50.0, k_co=32)
    assert weights.astype(bool).sum(0).max() <= 32
    sparse = evaluate_scores(q @ torch.from_numpy(weights.toarray()), split.test, n)
    assert sparse["recall@20"] >= 0.95 * dense["recall@20"] and sparse["ndcg@10"] >= 0.95 * dense["ndcg@10"]
    assert dense["recall@20"] > 0.25  # both far above chance (20 of 2.9k items)


def test_a_neighbourhood_takes_the_partners_of_highest_cosine_not_the_best_sellers() -> None:
    """Item 0 is in 10 orders: 4 with the best-seller 1 (in 1,000 orders) and 3 with the niche item 2 (in 3):
    by cosine 2 is its closer partner (3 / √30 against 4 / √10,000); padding where partners run out."""
    from training.models.neighbourhood import _top_co

    g = sp.csr_matrix(np.array([[10, 4, 3, 0], [4, 1000, 0, 0], [3, 0, 3, 0], [0, 0, 0, 5]], dtype=np.float64))
    top = _top_co(g, 1)
    assert top[:, 0].tolist() == [2, 0, 0, -1]
    assert _top_co(g, 3)[0].tolist() == [1, 2, -1]  # fewer partners than k: all of them


def test_top_rows_best_first() -> None:
    w = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, -1.0, 4.0]])
    index, weight = top_rows(w, 2)
    assert index.tolist() == [[1, 3], [0, 3]] and weight.tolist() == [[3.0, 2.0], [5.0, 4.0]]
    assert index.dtype == np.int32 and top_rows(w, 10)[0].shape == (2, 3)
    s_index, s_weight = top_rows(sp.csr_matrix(w.numpy()), 2)
    assert s_index.tolist() == index.tolist() and s_weight.tolist() == weight.tolist()


def test_training_picks_the_decoder_on_validation_and_scores_through_it() -> None:
    store = _tiny_store()
    text = np.random.default_rng(0).normal(size=(store.num_items, 16)).astype(np.float32)
    cfg = TrainConfig(hidden=8, epochs=2, negatives=4, batch_size=4, device="cpu", decoder_lambdas=[1.0, 10.0],
                      decoder_text_weights=[0.0, 5.0], decoder_gnn_weights=[0.0, 5.0])
    q = _queries([[0], [3]], [2, 4])
    result = train(store, text, cfg, val=q, progress=False)
    assert len(result.decoder_val) == 8 and result.decoder == max(result.decoder_val, key=result.decoder_val.get)
    assert result.decoder.method == "dense"
    graph = Graph.build(store, text, torch.device("cpu"))
    scores = score_queries(result.model, graph, q, result.decoder)
    fitted = decoder_for(result.decoder, graph, side_views(result.model, graph))
    assert torch.allclose(scores, q.matrix(5) @ fitted.weights)
    assert not torch.allclose(scores, score_queries(result.model, graph, q))  # not the cosine head
    off = train(store, text, cfg.model_copy(update={"decoder": False}), val=q, progress=False)
    assert off.decoder is None and off.decoder_val == {}
    large = train(store, text, cfg.model_copy(update={"decoder_dense_max_items": 4}), val=q, progress=False)
    assert large.decoder.method == "neighbourhood"  # too many items for a dense inversion: the sparse fit
    assert len(large.decoder_val) == 8  # the whole grid, in one pass
    # its points were ranked on sparse rows: the same NDCG@10 as ranking the dense scores
    from training.protocol import rank_queries

    best = decoder_for(large.decoder, graph, side_views(large.model, graph))
    dense_val = rank_queries(lambda qq, a, b: best.scores(qq.csr(5, a, b)), q, 5, top=False).metrics(5)["ndcg@10"]
    assert large.decoder_val[large.decoder] == dense_val


@pytest.mark.parametrize("cfg", [DecoderConfig(lam=3.0, text_weight=2.0, gnn_weight=0.0),
                                 DecoderConfig(lam=3.0, text_weight=2.0, gnn_weight=0.0, cold_weight=0.5)])
def test_text_ease_baseline_is_the_decoder_without_the_gnn(cfg: DecoderConfig) -> None:
    store = _tiny_store()
    text = np.random.default_rng(1).normal(size=(store.num_items, 16)).astype(np.float32)
    b = baselines.text_ease(store, text, cfg.lam, cfg.text_weight, cfg.cold_weight)
    graph = Graph.build(store, text, torch.device("cpu"))
    from training.models import BundleGNN

    model = BundleGNN(graph.x.size(1), hidden_channels=8)
    fitted = decoder_for(cfg, graph, side_views(model, graph))
    assert torch.allclose(b, fitted.weights, atol=1e-5)  # gnn_weight 0: the model plays no part


def test_the_gram_lookup_reads_every_pair_of_a_symmetric_matrix() -> None:
    """The neighbourhood fit reads G's pairs through ``_Lookup``: a dense block of the most connected items and
    a vectorised binary search for every other pair (stored or not, empty rows, an item with itself)."""
    from training.models.neighbourhood import _Lookup

    rng = np.random.default_rng(5)
    m = sp.random(300, 300, density=0.05, random_state=6, format="coo")
    keep = sp.diags(np.where(np.arange(300) == 7, 0.0, 1.0))  # item 7 without pairs
    g = (keep @ (m + m.T) @ keep).tocsr()
    g.eliminate_zeros()
    g.sum_duplicates()
    a, b = rng.integers(0, 300, 20_000), rng.integers(0, 300, 20_000)
    a[:300], b[:300] = np.arange(300), np.arange(300)
    stored = g.nonzero()
    a, b = np.concatenate([a, stored[0]]), np.concatenate([b, stored[1]])
    for dense in (0, 20, 300):
        assert np.array_equal(_Lookup(g, dense=dense)(a, b), g.toarray()[a, b])
    with pytest.raises(ValueError, match="sorted indices"):
        _Lookup(sp.csr_matrix((np.ones(2), np.array([1, 0]), np.array([0, 2])), shape=(1, 2)))
