"""Bulk tallies: the hash index against a dict, and batched graph updates against one event at a time."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from graph.events import Interaction, Order, OrderLine
from graph.store import GraphConfig, GraphStore
from graph.tallies import EdgeTable, KeyIndex
from training.datasets import online_retail_events

from tests.conftest import RETAIL_II


def test_key_index_agrees_with_a_dict_through_inserts_deletes_and_resizes() -> None:
    rng = np.random.default_rng(0)
    index, reference = KeyIndex(16), {}
    for step in range(40):
        keys = np.unique(rng.integers(0, 5000, 300) << 20 | rng.integers(0, 50, 300))
        absent = np.array([k for k in keys.tolist() if k not in reference], np.int64)
        index.put(absent, absent * 7 + step)
        reference.update({k: k * 7 + step for k in absent.tolist()})
        gone = np.array(rng.choice(list(reference), size=min(60, len(reference)), replace=False), np.int64)
        index.delete(gone)
        for k in gone.tolist():
            del reference[k]
        probe = np.concatenate([keys, gone, rng.integers(0, 1 << 40, 50)])
        assert index.get(probe).tolist() == [reference.get(k, -1) for k in probe.tolist()]
    assert index.size == len(reference) and len(index.keys) >= 2 * index.size


def test_edge_table_takes_back_an_edge_created_earlier_in_the_same_batch() -> None:
    table = EdgeTable(symmetric=True)
    table.grow(3)
    one = np.ones(3)
    table.update(np.array([0, 2, 1]), np.array([1, 1, 0]), np.array([1, 1, -1]), one, np.array([5.0, 6.0, 7.0]))
    assert table.get(0, 1) is None and table.get(1, 2).count == 1 and table.get(2, 1) == table.get(1, 2)
    assert len(table) == 1 and table.slots_of(0) == {} and list(table.slots_of(1)) == [2]


def _state(store: GraphStore) -> tuple:
    co = {(store.items.ids[a], store.items.ids[b]): (t.count, round(t.weight, 9), t.ts)
          for a in range(store.co.rows) for b in store.co.slots_of(a) if (t := store.co.get(a, b))}
    ui = {(store.users.ids[u], store.items.ids[i]): (t.count, round(t.weight, 9), t.ts)
          for u in range(store.ui.rows) for i in store.ui.slots_of(u) if (t := store.ui.get(u, i))}
    return co, ui, store.item_order_counts().tolist(), store.stats.as_dict(), store.version


def test_batches_of_order_facts_equal_one_event_at_a_time_on_real_orders_with_cancellations() -> None:
    """The stream worker's scoring process applies orders as their facts, in batches: same graph, same outcomes."""
    events = list(itertools.islice(online_retail_events(RETAIL_II), 3000))
    orders = [e for e in events if isinstance(e, Order)]
    at = datetime(2011, 1, 1, tzinfo=timezone.utc)
    # cancel every fifth order right after it, and add interactions and a duplicate
    extra = [o.model_copy(update={"status": "cancelled", "ts": at}) for o in orders[::5]]
    extra += [Interaction(user_id="u1", item_id=orders[0].item_ids[0], kind="view", ts=at), orders[3]]
    mixed = events + extra
    one, batched = GraphStore(), GraphStore()
    results = [one.apply(e) for e in mixed]
    got = []
    as_facts = [e.facts() if isinstance(e, Order) else e for e in mixed]
    for k in range(0, len(mixed), 700):
        got += batched.apply_many(as_facts[k : k + 700])
    assert got == results and _state(one) == _state(batched)
    # and both equal counting pairs by hand
    live: dict[str, Order | None] = {}
    for o in (e for e in mixed if isinstance(e, Order)):
        if o.status == "placed":
            live.setdefault(o.order_id, o)  # a duplicate, or a placement after its cancellation, is ignored
        else:
            live[o.order_id] = None
    live = {k: o for k, o in live.items() if o is not None}
    pairs = Counter(tuple(sorted(p)) for o in live.values() for p in itertools.combinations(o.item_ids, 2))
    co, *_ = _state(batched)
    assert {tuple(sorted(k)): v[0] for k, v in co.items()} == dict(pairs)


def test_one_batch_places_and_cancels_the_same_order() -> None:
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    placed = Order(order_id="o1", user_id="u", items=[OrderLine(item_id=i) for i in "ABC"], ts=t0)
    again = Order(order_id="o2", user_id="u", items=[OrderLine(item_id=i) for i in "AB"], ts=t0 + timedelta(days=1))
    store = GraphStore(GraphConfig(half_life_days=1))
    results = store.apply_many([placed, placed.model_copy(update={"status": "cancelled"}), again])
    assert [r.changed for r in results] == [True, True, True]
    assert store.num_co_edges() == 1 and store.co_purchase("A", "B").count == 1
    assert store.co_purchase("A", "B").value(again.epoch, store.clock) == pytest.approx(1.0)
    assert store.interaction("u", "C") is None and store.interaction("u", "A").count == 1
