"""Complement scoring (what the worker publishes): co-purchase cosine, borrowed lists, model scores, the wire form."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pytest

from graph.events import ItemUpserted, Order, OrderLine
from graph.store import GraphConfig, GraphStore
from tests.conftest import RETAIL_II, at
from tests.conftest import retail_events
from training.complements import BundleUpdate, ComplementScorer, ScorerConfig, unit

NOW = datetime(2026, 11, 23, 5, 0, tzinfo=timezone.utc)


def tiny() -> GraphStore:
    store = GraphStore(GraphConfig())
    for k, title in enumerate(['red "mug"', "blue mug", "tea towel", "lunch box", "bottle", "red mug saucer"]):
        store.apply(ItemUpserted(item_id=f"i{k}", title=title, price=k + 1.0, ts=at(0)))
    for n, b in enumerate([[0, 2], [0, 2, 3], [1, 2], [3, 4], [0, 2], [3, 4, 1]]):
        store.apply(Order(order_id=f"o{n}", user_id=f"u{n % 2}", items=[OrderLine(item_id=f"i{i}") for i in b],
                          ts=at(n)))
    return store


def test_co_purchase_cosine_by_hand() -> None:
    scorer = ComplementScorer(tiny())
    got = scorer.complements("i0")  # i0 is in 3 orders: with i2 in 3 (i2 in 4), with i3 in 1 (i3 in 3)
    assert [(c.item_id, c.orders, c.source) for c in got] == [("i2", 3, "co-purchase"), ("i3", 1, "co-purchase")]
    assert got[0].score == round(3 / math.sqrt(3 * 4), 6) and got[1].score == round(1 / math.sqrt(3 * 3), 6)
    assert scorer.complements("nope") == []
    assert [c.item_id for c in ComplementScorer(tiny(), ScorerConfig(top_k=1)).complements("i3")] == ["i4"]


def test_new_item_borrows_from_its_text_neighbours() -> None:
    store = tiny()
    scorer = ComplementScorer(store)
    text = unit(np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32))
    text[5] = unit((text[0] + 0.1 * text[5])[None])[0]  # "red mug saucer" reads like i0
    scorer.set_text(np.arange(6), text)
    got = scorer.complements("i5")  # no orders: i0's complements, scaled by the text similarity
    assert got and got[0].item_id == "i2" and got[0].source == "similar-text" and got[0].via == "i0"
    sim = float(text[5] @ text[0])
    assert got[0].score == pytest.approx(sim * round(3 / math.sqrt(12), 6), abs=1e-6) and got[0].orders == 0


def test_model_scores_by_hand() -> None:
    store = tiny()
    scorer = ComplementScorer(store)
    rng = np.random.default_rng(1)
    src, dst = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    prior = rng.normal(size=6)
    scorer.set_views("m1", store.items.ids, src, dst, prior, temperature=0.5)
    got = scorer.complements("i0")
    model = unit(src)[0] @ unit(dst).T / 0.5 + prior
    rows, _, weights = store.co_neighbours(0)
    w = dict(zip(rows.tolist(), weights.tolist()))
    score = model + np.array([math.log1p(w.get(b, 0.0)) for b in range(6)])
    score[0] = -np.inf
    assert [c.item_id for c in got] == [f"i{b}" for b in np.argsort(-score, kind="stable")[:5]]
    assert all(c.source == "model" and c.score == pytest.approx(score[int(c.item_id[1:])], abs=1e-5)
               and c.model_score == pytest.approx(model[int(c.item_id[1:])], abs=1e-5) for c in got)
    assert {c.item_id: c.orders for c in got}["i2"] == 3


@pytest.mark.parametrize("source_ts", [None, 1.7e9, math.inf])
def test_wire_form_parses_to_the_same_update(source_ts: float | None) -> None:
    """``update_json`` (the worker's hot path) and ``update`` agree on every path and item."""
    store = GraphStore(GraphConfig())
    store.apply_all(retail_events(RETAIL_II))
    store.apply(ItemUpserted(item_id='odd "id" \\ é', title="RED RETROSPOT CAKE STAND", ts=at(900)))
    scorer = ComplementScorer(store)
    rng = np.random.default_rng(2)
    scorer.set_text(np.arange(store.num_items), unit(rng.normal(size=(store.num_items, 8)).astype(np.float32)))
    items = store.items.ids[:400] + ['odd "id" \\ é', "unknown"]
    for views in (False, True):
        if views:
            n = store.num_items - 5  # the last five items get no view: co-purchase/borrowed paths beside the model
            scorer.set_views("v1", store.items.ids[:n], rng.normal(size=(n, 8)), rng.normal(size=(n, 8)),
                             rng.normal(size=n), 0.1)
            items += store.items.ids[-5:]
        for item in items:
            wire = BundleUpdate.model_validate_json(scorer.update_json(item, source_ts, NOW))
            assert wire == scorer.update(item, source_ts, NOW), item
    assert json.loads(scorer.update_json(store.items.ids[0], source_ts, NOW))["updated_at"] == NOW.isoformat()
    counts = store.item_order_counts()
    assert [scorer.update(i).orders for i in store.items.ids[:50]] == counts[:50].tolist() and counts[:50].any()
    assert scorer.update("unknown").orders == 0


def test_decoder_rows_rank_with_fresh_co_purchases_boosted_in() -> None:
    store = tiny()
    scorer = ComplementScorer(store, ScorerConfig(decoder_boost=0.05))
    rng = np.random.default_rng(3)
    ids = store.items.ids + ["later"]  # the artifact knows an item the store has not seen yet
    index = np.array([[6, 4, 2, 5, 0]] + [[0, 1, 2, 3, 4]] * 6, np.int32)
    weight = np.array([[0.9, 0.3, 0.2, 0.1, -0.2]] + [[0.1] * 5] * 6, np.float32)
    scorer.set_views("m2", ids, rng.normal(size=(7, 4)), rng.normal(size=(7, 4)), np.zeros(7), 0.5, (ids, index, weight))
    rows, _, weights = store.co_neighbours(0)  # i0 with i2 and i3
    w = dict(zip(rows.tolist(), weights.tolist()))
    boost = {b: 0.05 * math.log1p(v) for b, v in w.items()}
    got = scorer.complements("i0")
    expect = sorted([("i4", 0.3), ("i2", 0.2 + boost[2]), ("i5", 0.1), ("i3", boost[3])], key=lambda c: -c[1])
    assert [(c.item_id, c.source) for c in got] == [(i, "decoder") for i, _ in expect]  # "later" unknown, i0 itself
    assert [c.score for c in got] == pytest.approx([s for _, s in expect], abs=1e-6)
    assert {c.item_id: c.model_score for c in got}["i3"] == 0.0 and {c.item_id: c.orders for c in got}["i2"] == 3
    store.apply(ItemUpserted(item_id="later", title="red mug lid", ts=at(9)))
    assert scorer.complements("i0")[0].item_id == "later"  # arrives: its decoder weight counts from now on
    assert BundleUpdate.model_validate_json(scorer.update_json("i0", None, NOW)) == scorer.update("i0", None, NOW)
    scorer.set_views("m3", ids[:3], rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), np.zeros(3), 0.5)
    assert scorer.complements("i0")[0].source == "model"  # a model without a decoder: the views again


def test_substitutes_are_near_identical_texts_of_one_category_never_bought_together() -> None:
    store = tiny()
    for k, (title, category) in enumerate([("red mug", "mugs"), ("red mug", "mugs"), ("red mug", "saucers"),
                                           ("red mug", None)], start=6):
        store.apply(ItemUpserted(item_id=f"i{k}", title=title, category=category, ts=at(0)))
    store.apply(Order(order_id="o-twins", items=[OrderLine(item_id="i6"), OrderLine(item_id="i7")], ts=at(9)))
    text = unit(np.random.default_rng(2).normal(size=(10, 8)).astype(np.float32))
    text[6:] = text[6]  # i6–i9 read the same
    scorer = ComplementScorer(store)
    scorer.set_text(np.arange(10), text)
    # i7: bought with i6 (a complement); i8: another category; i9: no category, text decides
    assert scorer.substitutes("i6") == ["i9"]
    plain = ComplementScorer(store, ScorerConfig(substitute_same_category=False))
    plain.set_text(np.arange(10), text)
    assert sorted(plain.substitutes("i6")) == ["i8", "i9"]
    assert sorted(scorer.substitutes("i9")) == ["i6", "i7", "i8"]  # an item without a category: text alone
