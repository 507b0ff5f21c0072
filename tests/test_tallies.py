"""The compact edge tables: against a dict, against a plain recount of real orders, and their size."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from graph.events import Interaction, Order, OrderLine
from graph.store import DAY, GraphConfig, GraphStore
from graph.tallies import EdgeTable, KeyIndex, Rows
from tests.conftest import RETAIL_II, retail_events


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
        moved = np.array(list(reference)[:10], np.int64)
        index.set(moved, moved + 1)
        reference.update({k: k + 1 for k in moved.tolist()})
        probe = np.concatenate([keys, gone, rng.integers(0, 1 << 40, 50)])
        assert index.get(probe).tolist() == [reference.get(k, -1) for k in probe.tolist()]
    assert index.size == len(reference) and len(index.keys) >= 2 * index.size


def _change(entries: dict[tuple[int, int], tuple[int, float]], rows: int) -> Rows:
    """Sparse rows of ``{(row, col): (count, weight)}``."""
    keys = sorted(entries)
    indptr = np.searchsorted([r for r, _ in keys], np.arange(rows + 1)) if keys else np.zeros(rows + 1, np.int64)
    return Rows(np.asarray(indptr, np.int64), np.array([c for _, c in keys], np.int32),
                np.array([entries[k][0] for k in keys], np.int64), np.array([entries[k][1] for k in keys]))


def test_edge_table_agrees_with_a_dict_through_merges_and_take_backs() -> None:
    """Small blocks and buffer, so batches land in the buffer, in blocks, and across both."""
    rng = np.random.default_rng(1)
    table, reference = EdgeTable(symmetric=False, block_rows=7, min_buffer=40), defaultdict(lambda: [0, 0.0])
    added: dict[tuple[int, int], list[float]] = defaultdict(list)  # amounts a take-back can undo, as an order's
    for step in range(200):
        rows = 5 + step // 10
        batch: dict[tuple[int, int], tuple[int, float]] = {}
        for _ in range(int(rng.integers(1, 30))):
            key = (int(rng.integers(rows)), int(rng.integers(rows)))
            if added[key] and rng.random() < 0.4:  # take back an earlier observation exactly
                sign, amount = -1, added[key].pop(int(rng.integers(len(added[key]))))
            else:
                sign, amount = 1, float(rng.random())
                added[key].append(amount)
            count, weight = batch.get(key, (0, 0.0))
            batch[key] = (count + sign, weight + sign * amount)
        table.add(_change({k: v for k, v in batch.items() if v != (0, 0.0)}, rows))
        for key, (count, weight) in batch.items():
            reference[key][0] += count
            reference[key][1] += weight
        live = {k: v for k, v in reference.items() if v[0] > 0}
        if step % 20 == 19:
            assert len(table) == len(live)
        for r in range(rows):
            index, count, weight = table.neighbours(r)
            expect = sorted((c, v) for (a, c), v in live.items() if a == r)
            assert index.tolist() == [c for c, _ in expect] and count.tolist() == [v[0] for _, v in expect]
            assert np.allclose(weight, [v[1] for _, v in expect], atol=1e-4)
        a, b = (int(x) for x in rng.integers(rows, size=2))
        got = table.get(a, b)
        assert (got[0] if got else 0) == (live[(a, b)][0] if (a, b) in live else 0)
    a, b, count, weight = table.edges()
    assert sorted(zip(a.tolist(), b.tolist())) == sorted(live) and count.tolist() == [live[k][0] for k in zip(a, b)]


def _store(config: GraphConfig, small: bool) -> GraphStore:
    store = GraphStore(config)
    if small:  # many buffer merges and blocks
        store.co = EdgeTable(symmetric=True, block_rows=128, min_buffer=5_000)
        store.ui = EdgeTable(symmetric=False, block_rows=16, min_buffer=500)
    return store


def _state(store: GraphStore) -> tuple:
    ids, users = store.items.ids, store.users.ids
    a, b, count, weight = store.co_edges()
    co = {(ids[x], ids[y]) if ids[x] < ids[y] else (ids[y], ids[x]): (c, w)
          for x, y, c, w in zip(a.tolist(), b.tolist(), count.tolist(), weight.tolist())}
    u, i, count, weight = store.ui_edges()
    ui = {(users[x], ids[y]): (c, w) for x, y, c, w in zip(u.tolist(), i.tolist(), count.tolist(), weight.tolist())}
    items = dict(zip(ids, store.item_order_counts().tolist()))
    return co, ui, items, store.stats.as_dict(), store.version


def same(a: dict, b: dict) -> bool:
    """Equal counts, and weights within float32 rounding."""
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and a[k][1] == pytest.approx(b[k][1], rel=1e-5)
                                         for k in a)


def test_compact_store_equals_a_plain_recount_of_real_orders_with_cancellations_duplicates_and_interactions() -> None:
    """One event at a time, batches of order facts, and small tables that merge often all give the graph a
    dict recount gives: pair counts and decayed weights, user–item edges, item order counts."""
    events = retail_events()[:3000]
    orders = [e for e in events if isinstance(e, Order)]
    at = max(e.ts for e in events) + timedelta(days=1)
    # cancel every fifth order right after it, and add interactions and a duplicate
    extra = [o.model_copy(update={"status": "cancelled", "ts": at}) for o in orders[::5]]
    extra += [Interaction(user_id=f"u{k % 7}", item_id=orders[k].item_ids[0], kind=("view", "cart")[k % 2],
                          ts=at + timedelta(hours=k)) for k in range(50)]
    extra += [orders[3]]
    mixed = events + extra
    config = GraphConfig(order_window_days=None)
    one, batched, small = GraphStore(config), GraphStore(config), _store(config, small=True)
    results = [one.apply(e) for e in mixed]
    as_facts = [e.facts() if isinstance(e, Order) else e for e in mixed]
    got, got_small = [], []
    for k in range(0, len(mixed), 700):
        got += batched.apply_many(as_facts[k : k + 700])
        got_small += small.apply_many(as_facts[k : k + 111])  # a different batching
        got_small += small.apply_many(as_facts[k + 111 : k + 700])
    assert got == results == got_small
    for other in (batched, small):  # weights are float32: equal up to the order of additions
        a, b = _state(one), _state(other)
        assert a[2:] == b[2:] and all(same(a[k], b[k]) for k in (0, 1))

    # by hand: live orders, their pairs, weights decayed to the newest event
    live: dict[str, Order | None] = {}
    for o in (e for e in mixed if isinstance(e, Order)):
        if o.status == "placed":
            live.setdefault(o.order_id, o)  # a duplicate, or a placement after its cancellation, is ignored
        else:
            live[o.order_id] = None
    kept = [o for o in live.values() if o is not None]
    now, half = max(e.epoch for e in mixed), config.half_life_days * DAY
    pairs: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for o in kept:
        for p in itertools.combinations(sorted(o.item_ids), 2):
            pairs[p][0] += 1
            pairs[p][1] += 2 ** ((o.epoch - now) / half)
    co, ui, items, *_ = _state(small)
    assert co.keys() == pairs.keys()
    assert all(co[k][0] == pairs[k][0] and co[k][1] == pytest.approx(pairs[k][1], abs=2e-4) for k in pairs)
    weights = config.interaction_weights
    by_user: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for o in kept:
        for i in o.item_ids if o.user_id else ():
            by_user[(o.user_id, i)][0] += 1
            by_user[(o.user_id, i)][1] += weights["purchase"] * 2 ** ((o.epoch - now) / half)
    for e in (e for e in mixed if isinstance(e, Interaction)):
        by_user[(e.user_id, e.item_id)][0] += 1
        by_user[(e.user_id, e.item_id)][1] += weights[e.kind] * 2 ** ((e.epoch - now) / half)
    assert ui.keys() == by_user.keys()
    assert all(ui[k][0] == by_user[k][0] and ui[k][1] == pytest.approx(by_user[k][1], abs=2e-4) for k in by_user)
    counted = Counter(i for o in kept for i in o.item_ids)
    assert {k: v for k, v in items.items() if v} == dict(counted)


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


def test_a_co_purchase_pair_takes_24_bytes(retail_replay) -> None:
    """Both directions of a pair, with count and weight: 2 × (4 + 4 + 4) bytes, plus one row pointer per item."""
    store, _ = retail_replay
    pairs = store.num_co_edges()
    assert store.co.nbytes <= 24 * pairs + 8 * (store.num_items + len(store.co.blocks))
    assert store.co.nbytes / pairs < 24.1


def test_csr_with_and_without_diagonal_equals_the_edges_on_real_orders_in_small_blocks() -> None:
    """The matrices the decoder reads, filled block by block, against a COO matrix of :meth:`EdgeTable.edges`:
    small blocks with a pending buffer, items beyond the last block, explicit diagonals."""
    store = _store(GraphConfig(), small=True)
    store.apply_all(list(retail_events(RETAIL_II))[:6000])
    n = store.num_items
    a, b, count, weight = store.co_edges()
    full = np.zeros((n, n))
    full[a, b] = full[b, a] = count
    co = store.co_purchase_matrix(counts=True)
    assert co.dtype == np.float32 and co.indices.dtype == np.int32 and co.shape == (n, n)
    assert co.has_sorted_indices and np.array_equal(co.toarray(), full)
    diag = store.item_order_counts()
    g = store.co_purchase_matrix(counts=True, diagonal=diag)
    assert g.has_sorted_indices and g.nnz == co.nnz + n
    assert np.array_equal(g.toarray(), full + np.diag(diag)) and np.array_equal(g.diagonal(), diag)
    w = np.zeros((n, n))
    w[a, b] = w[b, a] = weight  # co_edges decays them
    assert np.allclose(store.co_purchase_matrix().toarray(), w, rtol=1e-6)
    with pytest.raises(ValueError, match="diagonal has 3 values"):
        store.co_purchase_matrix(diagonal=np.zeros(3))
