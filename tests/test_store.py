"""Graph updates: counts, decayed weights, idempotency, cancellations, growing id maps."""

from __future__ import annotations

import math
import zlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from graph.events import Interaction, ItemUpserted, Order, OrderLine
from graph.store import ROUTED, GraphConfig, GraphStore
from tests.conftest import at

HALF_LIFE_DAYS = 10.0


def order(oid: str, items: list[str], day: float, user: str | None = "u1", status: str = "placed") -> Order:
    return Order(order_id=oid, user_id=user, items=[OrderLine(item_id=i) for i in items], ts=at(day), status=status)


@pytest.fixture
def store() -> GraphStore:
    return GraphStore(GraphConfig(half_life_days=HALF_LIFE_DAYS))


def test_order_adds_pairs_and_user_edges(store: GraphStore) -> None:
    applied = store.apply(order("o1", ["A", "B", "C", "A"], 0))
    assert applied.changed and applied.items == ("A", "B", "C")
    assert store.num_items == 3 and store.num_users == 1
    assert store.num_co_edges() == 3
    assert store.co_purchase("A", "B").count == 1 and store.co_purchase("B", "A") == store.co_purchase("A", "B")
    assert store.co_purchase("A", "A") is None
    assert store.num_ui_edges() == 3
    assert store.interaction("u1", "C").value(at(0).timestamp(), store.clock) == pytest.approx(5.0)  # purchase
    assert list(store.item_order_counts()) == [1, 1, 1]
    assert store.stats.placeholder_items == 3  # seen in an order before the catalog


def test_weights_decay_with_half_life(store: GraphStore) -> None:
    store.apply(order("o1", ["A", "B"], 0))
    store.apply(order("o2", ["A", "B"], HALF_LIFE_DAYS))
    tally = store.co_purchase("A", "B")
    assert tally.count == 2
    # first order has halved by the time of the second
    assert tally.value(at(HALF_LIFE_DAYS).timestamp(), store.clock) == pytest.approx(1.5)
    assert tally.value(at(3 * HALF_LIFE_DAYS).timestamp(), store.clock) == pytest.approx(0.375)
    # reading at an earlier time than the newest event never inflates a weight
    assert tally.value(at(0).timestamp(), store.clock) == pytest.approx(1.5)


def test_late_event_gives_the_same_weight_as_in_order() -> None:
    in_order, late = GraphStore(GraphConfig(half_life_days=3)), GraphStore(GraphConfig(half_life_days=3))
    events = [order("o1", ["A", "B"], 0), order("o2", ["A", "B"], 5), order("o3", ["A", "B"], 7.5)]
    in_order.apply_all(events)
    late.apply_all([events[2], events[0], events[1]])
    now = at(9).timestamp()
    a, b = in_order.co_purchase("A", "B"), late.co_purchase("A", "B")
    expected = sum(2 ** (-(9 - d) / 3) for d in (0, 5, 7.5))
    assert a.value(now, in_order.clock) == pytest.approx(expected)
    assert b.value(now, late.clock) == pytest.approx(expected)


def test_weights_stay_exact_over_many_half_lives_and_a_moved_reference() -> None:
    """The decay clock's reference moves before its factors overflow; weights read the same after it."""
    store = GraphStore(GraphConfig(half_life_days=1, order_window_days=None))
    store.apply(order("o1", ["A", "B"], 0))
    ref = store.clock.ref
    store.apply(order("o2", ["A", "B"], 300))  # 300 half-lives later: past the clock's limit
    assert store.clock.ref == at(300).timestamp() != ref
    ab = store.co_purchase("A", "B")
    assert ab.value(at(300).timestamp(), store.clock) == pytest.approx(1 + 2.0**-300)
    assert ab.value(at(301).timestamp(), store.clock) == pytest.approx(0.5)
    store.apply(order("o1", ["A"], 302, status="cancelled"))  # takes back the day-0 order, in today's scale
    ab = store.co_purchase("A", "B")  # a tally read out is a value: read it again
    assert ab.count == 1 and ab.value(at(302).timestamp(), store.clock) == pytest.approx(0.25)  # day 300's order
    assert ab.value(at(300).timestamp(), store.clock) == pytest.approx(0.25)  # reads never go back before day 302


def test_duplicate_order_changes_nothing(store: GraphStore) -> None:
    store.apply(order("o1", ["A", "B"], 0))
    version, weight = store.version, store.co_purchase("A", "B").weight
    again = store.apply(order("o1", ["A", "B", "C"], 1))
    assert not again.changed and "already applied" in again.note
    assert store.version == version and store.co_purchase("A", "B").weight == weight
    assert "C" not in store.items and store.stats.duplicates == 1


def test_cancellation_takes_the_order_back_exactly(store: GraphStore) -> None:
    store.apply(order("o1", ["A", "B"], 0))
    store.apply(order("o2", ["A", "B", "C"], 2))
    before = store.co_purchase("A", "B").value(at(4).timestamp(), store.clock)
    cancel = store.apply(order("o2", ["A"], 4, status="cancelled"))
    assert cancel.changed and set(cancel.items) == {"A", "B", "C"}
    ab = store.co_purchase("A", "B")
    assert ab.count == 1
    assert ab.value(at(4).timestamp(), store.clock) == pytest.approx(before - 2 ** (-2 / HALF_LIFE_DAYS))
    assert ab.value(at(4).timestamp(), store.clock) == pytest.approx(2 ** (-4 / HALF_LIFE_DAYS))
    assert store.co_purchase("A", "C") is None and store.co_purchase("B", "C") is None  # count 0: edge gone
    assert store.interaction("u1", "C") is None
    assert list(store.item_order_counts()) == [1, 1, 0]
    # cancelling twice, or placing the cancelled order again, changes nothing
    assert not store.apply(order("o2", ["A"], 5, status="cancelled")).changed
    assert not store.apply(order("o2", ["A", "B", "C"], 6)).changed
    assert store.co_purchase("A", "B").count == 1


def test_cancellation_of_unknown_order_is_counted_and_blocks_a_late_placement(store: GraphStore) -> None:
    result = store.apply(order("o9", ["A", "B"], 1, status="cancelled"))
    assert not result.changed and "unknown order" in result.note and result.rejected
    assert store.stats.cancellations_unmatched == 1 and store.num_items == 0
    assert not store.apply(order("o9", ["A", "B"], 0)).changed
    assert store.num_co_edges() == 0


def test_interactions_weighted_by_kind(store: GraphStore) -> None:
    for kind in ("view", "view", "cart"):
        store.apply(Interaction(user_id="u7", item_id="A", kind=kind, ts=at(0)))
    tally = store.interaction("u7", "A")
    assert tally.count == 3 and tally.value(at(0).timestamp(), store.clock) == pytest.approx(1 + 1 + 3)


def test_catalog_upserts_fill_placeholders_and_ignore_stale_or_same(store: GraphStore) -> None:
    store.apply(order("o1", ["A", "B"], 0))
    assert store.catalog[0].title == "A" and not store.catalog[0].has_text
    up = ItemUpserted(item_id="A", title="Red mug", description="Stoneware", category="kitchen", price=3.0, ts=at(1))
    assert store.apply(up).changed
    assert store.catalog[0].has_text and store.catalog[0].text == "Red mug. Stoneware"
    assert store.stats.placeholder_items == 1
    assert store.text_rows().tolist() == [0]  # B is known only from the order
    assert not store.apply(up.model_copy(update={"ts": at(2)})).changed  # same content
    assert not store.apply(up.model_copy(update={"title": "Old", "ts": at(0.5)})).changed  # older
    assert store.apply(up.model_copy(update={"in_stock": False, "ts": at(3)})).changed
    assert not store.catalog[0].in_stock and store.catalog[0].title == "Red mug"
    new = store.apply(ItemUpserted(item_id="Z", title="New lamp", ts=at(4)))
    assert new.changed and store.items.get("Z") == 2 and store.num_items == 2 + 1
    assert store.text_rows().tolist() == [0, 2]


def test_max_order_items_skips_pairs_of_huge_orders() -> None:
    store = GraphStore(GraphConfig(max_order_items=3))
    store.apply(order("big", ["A", "B", "C", "D"], 0))
    assert store.num_co_edges() == 0 and store.stats.oversized_orders == 1
    assert list(store.item_order_counts()) == [1, 1, 1, 1]


def test_sparse_matrices_match_edges(store: GraphStore) -> None:
    store.apply(order("o1", ["A", "B", "C"], 0, user="u1"))
    store.apply(order("o2", ["A", "B"], HALF_LIFE_DAYS, user="u2"))
    co = store.co_purchase_matrix(counts=True)
    assert co.shape == (3, 3) and (co != co.T).nnz == 0
    assert co[0, 1] == 2 and co[0, 2] == 1 and co[0, 0] == 0
    w = store.co_purchase_matrix()
    assert w[0, 1] == pytest.approx(1.5) and w[1, 2] == pytest.approx(0.5)
    ui = store.user_item_matrix(counts=True)
    assert ui.shape == (2, 3) and ui.sum() == 5
    assert math.isclose(store.user_item_matrix()[1, 0], 5.0)


def test_the_order_window_keeps_repeats_and_cancellations_exact_and_refuses_what_it_cannot_check() -> None:
    store = GraphStore(GraphConfig(half_life_days=HALF_LIFE_DAYS, order_window_days=30))
    store.apply(order("o1", ["A", "B"], 0))
    store.apply(order("o2", ["A", "B"], 20))
    assert store.apply(order("o1", ["A", "B"], 0)).note == "order o1 already applied"  # inside: a repeat
    store.apply(order("o3", ["C", "D"], 45))  # the newest order moves the window to day 15
    repeat = store.apply(order("o1", ["A", "B"], 0))
    assert repeat.rejected and not repeat.changed
    assert repeat.note == ("order o1 is dated 45.0 days before the newest order, outside the 30.0 days window in "
                           "which the store can tell a repeat or take it back (graph.order_window_days)")
    late_cancel = store.apply(order("o1", ["A"], 46, status="cancelled"))  # o1 left the window: cannot take back
    assert late_cancel.rejected and "never seen, or placed more than 30.0 days before" in late_cancel.note
    assert store.co_purchase("A", "B").count == 2
    assert store.apply(order("o2", ["A"], 46, status="cancelled")).changed  # o2 (day 20) is still inside
    assert store.co_purchase("A", "B").count == 1
    assert store.stats.outside_window == 1 and len(store.orders) == 3  # o2, o3, and o1's refused cancellation


def test_the_order_log_stays_the_size_of_the_window() -> None:
    """Memory for orders grows with the window, not with history: expired records are reclaimed in bulk."""
    store = GraphStore(GraphConfig(order_window_days=10))
    for day in range(0, 600):
        store.apply_many([order(f"o{day}-{k}", ["A", "B", f"X{k}"], day + k / 10) for k in range(5)])
    log = store.orders
    assert len(log) == 5 * 11 - 4  # days 589.4 .. 599.4 inside the 10-day window
    assert log.size < 2 * 1024 and log.used_items < 3 * 2 * 1024  # not the 3,000 orders seen
    assert store.apply(order("o599-4", ["A", "B"], 599.4)).note == "order o599-4 already applied"
    assert store.co_purchase("A", "B").count == 3_000 and store.stats.future == 0


def test_events_dated_far_in_the_future_are_refused() -> None:
    """One far-future date would move the decay clock and shrink every other weight to nothing."""
    store = GraphStore(GraphConfig())
    store.apply(order("o1", ["A", "B"], 0))
    future = Order(order_id="o2", items=[OrderLine(item_id="A"), OrderLine(item_id="B")],
                   ts=datetime(9999, 12, 31, tzinfo=timezone.utc))
    result = store.apply(future)
    assert result.rejected and not result.changed and "in the future" in result.note
    assert store.co_purchase("A", "B").count == 1 and store.stats.future == 1


def test_the_window_follows_each_stream_so_a_partition_read_ahead_pushes_no_other_out() -> None:
    """The worker reads partitions unevenly; each keeps its own newest order, as a file import keeps one."""
    events = [order("a1", ["A", "B"], 0), order("b1", ["A", "C"], 1), order("a2", ["A", "B"], 200),
              order("b2", ["A", "C"], 2), order("b1", ["A"], 3, status="cancelled")]
    one = GraphStore(GraphConfig(order_window_days=30))
    refused = [r.rejected for r in one.apply_many(events)]
    assert refused == [False, False, False, True, True]  # one stream: day 200 pushed days 2 and 3 out
    two = GraphStore(GraphConfig(order_window_days=30))
    results = two.apply_many(events, streams=[0, 1, 0, 1, 1])  # a* on partition 0, b* on partition 1
    assert not any(r.rejected for r in results) and results[-1].changed
    assert two.co_purchase("A", "B").count == 2 and two.co_purchase("A", "C").count == 1
    assert two.stats.outside_window == 0 and len(two.orders) == 3  # a2, b1 (cancelled), b2: a1 left partition 0's


def test_interactions_with_an_event_id_count_once_and_stay_so_after_a_snapshot(tmp_path) -> None:
    """An interaction sent twice with its ``event_id`` (a producer retry, a replay after a crash) counts once
    inside the order window, in one batch or two, and after a snapshot round trip; without an id every copy
    counts; an id dated before the window is refused (it could not be checked)."""
    from graph.snapshot import load, save

    def cart(event_id: str | None, day: float = 0) -> Interaction:
        return Interaction(user_id="u", item_id="A", kind="cart", ts=at(day), event_id=event_id)

    store = GraphStore(GraphConfig(order_window_days=30))
    results = store.apply_many([cart("e1"), cart("e1"), cart("e2")])
    assert [r.changed for r in results] == [True, False, True] and "e1 already applied" in results[1].note
    assert not store.apply(cart("e2")).changed
    assert store.user_item_matrix(counts=True).toarray().sum() == 2
    assert all(store.apply(cart(None)).changed for _ in range(2))  # no id: each copy counts
    assert store.user_item_matrix(counts=True).toarray().sum() == 4
    save(store, tmp_path / "snap")
    loaded = load(tmp_path / "snap")
    assert not loaded.apply(cart("e1", day=1)).changed and loaded.apply(cart("e3", day=40)).changed
    old = loaded.apply(cart("e4", day=5))  # 35 days before the newest: outside the window
    assert old.rejected and "outside the 30.0 days window" in old.note
    assert loaded.user_item_matrix(counts=True).toarray().sum() == 5



def _by_item(store: GraphStore, now: float, partition: int = 0) -> tuple[dict[str, tuple], dict[str, float]]:
    """The co-purchase row, order count and user edges of every item of ``partition``, by ids (counts), and
    every weight among them as seen at ``now``."""
    out, weights = {}, {}
    u, i, count, weight = store.ui.edges()
    ui: dict[int, list] = {}
    for user, item, c, w in zip(u.tolist(), i.tolist(), count.tolist(), store.decayed(weight, now).tolist()):
        ui.setdefault(item, []).append((store.users.ids[user], c))
        weights[f"{store.users.ids[user]}>{store.items.ids[item]}"] = w
    rows = np.flatnonzero(store.part_of(np.arange(store.num_items)) == partition)
    for row in rows.tolist():
        a = store.items.ids[row]
        index, counts, w = store.co.neighbours(row)
        weights.update({f"{a}~{store.items.ids[b]}": x for b, x in zip(index.tolist(), store.decayed(w, now).tolist())})
        pairs = sorted((store.items.ids[b], int(c)) for b, c in zip(index, counts))
        out[a] = (pairs, int(store.item_orders.count[row]), sorted(ui.get(row, [])))
    return out, {k: v for k, v in weights.items() if k.split(">")[-1].split("~")[0] in out}


def _crc(key: str, parts: int) -> int:
    return zlib.crc32(key.encode()) % parts


def _partitioned(stream: list, parts: int, batch: int = 700) -> list[GraphStore]:
    """The stores of ``parts`` item partitions fed as the stream worker feeds them: partition ``p``'s store
    takes the orders of order partition ``p`` (key: order id) and the interactions of partition ``p`` (key:
    user), applies them to its own items and sends each other partition its share; every store takes every
    catalog upsert."""
    stores = [GraphStore(GraphConfig(), partition_of=lambda item: _crc(item, parts)) for _ in range(parts)]
    inbox: list[list] = [[] for _ in range(parts)]  # (event, stream)
    for start in range(0, len(stream), batch):
        for e in stream[start:start + batch]:
            if isinstance(e, ItemUpserted):
                for box in inbox:
                    box.append((e, ROUTED))
            else:
                inbox[_crc(e.order_id if isinstance(e, Order) else e.user_id, parts)].append((e, None))
        for p, store in enumerate(stores):
            todo, inbox[p] = inbox[p], []
            events = [e for e, _ in todo]
            for e, applied in zip(events, store.apply_many(events, [p if s is None else s for _, s in todo])):
                if applied.change is not None:
                    others = {_crc(i, parts) for i in applied.change.item_ids} - {p}
                    for share in applied.change.shares(sorted(others)):
                        inbox[share.partition].append((share, ROUTED))
                elif isinstance(e, Interaction) and applied.changed and (q := _crc(e.item_id, parts)) != p:
                    inbox[q].append((e.model_copy(update={"event_id": None}), ROUTED))
    for p, store in enumerate(stores):  # what was sent last
        store.apply_many([e for e, _ in inbox[p]], [s for _, s in inbox[p]])
    return stores


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_item_partitioned_stores_fed_their_shares_hold_exactly_the_graph_of_one_store(parts: int) -> None:
    """The order → item repartition: each order partition's store decides what an order changes (repeats,
    take-backs, windows), applies it to its own items and sends the other partitions their shares; the
    partitions' rows together equal the graph one store builds from the same events."""
    from tests.conftest import retail_events

    events = retail_events()
    orders = [e for e in events if isinstance(e, Order)]
    extra = [orders[5], orders[40].model_copy(update={"status": "cancelled"}), orders[40]]  # a repeat, a take-back
    users = sorted({o.user_id for o in orders if o.user_id})[:20]
    clicks = [Interaction(user_id=users[k % 20], item_id=orders[k].items[0].item_id, kind="cart", ts=orders[k].ts,
                          event_id=f"c{k}") for k in range(60)]
    stream = sorted(events + extra + clicks + clicks[::3], key=lambda e: e.ts)  # a third sent twice: counted once
    whole = GraphStore(GraphConfig())
    whole.apply_all(stream)
    now = whole.last_ts
    union: dict[str, tuple] = {}
    weights: dict[str, float] = {}
    for p, store in enumerate(_partitioned(stream, parts)):
        mine, w = _by_item(store, now, p)
        assert not set(mine) & set(union)
        union.update(mine)
        weights.update(w)
    expected, expected_weights = _by_item(whole, now)
    assert union == expected
    assert weights.keys() == expected_weights.keys()
    assert np.allclose([weights[k] for k in expected_weights], list(expected_weights.values()), rtol=1e-5, atol=1e-5)  # float32 sums
    assert sum(len(v[0]) for v in expected.values()) == 2 * whole.num_co_edges() > 0
    assert sum(len(v[2]) for v in expected.values()) == whole.num_ui_edges() > 0
    assert whole.stats.orders_cancelled > 0 and whole.stats.duplicates > 0


@pytest.mark.parametrize("moves", ["one worker", "two workers", "three workers", "a worker joins", "a worker leaves"])
def test_partitions_moving_between_workers_through_their_checkpoints_keep_the_graph_of_one_store(
        moves: str, tmp_path) -> None:
    """Four item partitions on 1–3 workers (one store each): when a partition moves, its worker checkpoints it
    (``part``, written and read as a snapshot) and forgets it (``release``), and the new owner ``adopt`` s it;
    the union of what the workers hold then still equals the graph one store builds."""
    from graph.snapshot import load, save
    from tests.conftest import retail_events

    parts = 4
    plans = {"one worker": [[0, 0, 0, 0]], "two workers": [[0, 1, 0, 1]], "three workers": [[0, 1, 2, 0]],
             "a worker joins": [[0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 2, 1]], "a worker leaves": [[0, 1, 2, 0], [0, 1, 1, 0]]}
    plan = plans[moves]
    events = retail_events()
    orders = [e for e in events if isinstance(e, Order) and e.status == "placed"][::6]
    later = lambda o, days, **kw: o.model_copy(update={"ts": o.ts + timedelta(days=days), **kw})  # noqa: E731
    again = [later(o, 20) for o in orders[::2]] + [later(o, 15, status="cancelled") for o in orders[1::2]]
    stream = sorted(events + again, key=lambda e: e.ts)  # repeats and take-backs after their orders moved
    stores = [GraphStore(GraphConfig(), partition_of=lambda item: _crc(item, parts)) for _ in range(3)]
    inbox: list[list] = [[] for _ in range(parts)]  # per partition: (event, stream)
    owner = plan[0]
    chunks = np.array_split(np.arange(len(stream)), 12)
    for k, chunk in enumerate(chunks):
        now = plan[min(len(plan) - 1, k * len(plan) // len(chunks))]
        for p in range(parts):
            if now[p] != owner[p]:  # the partition moves, through its checkpoint
                save(stores[owner[p]].part(p), tmp_path / f"p{p}")
                stores[owner[p]].release(p)
                stores[now[p]].adopt(load(tmp_path / f"p{p}"))
        owner = now
        for e in (stream[i] for i in chunk.tolist()):
            if isinstance(e, ItemUpserted):
                for store in stores:
                    store.apply(e)
            else:
                inbox[_crc(e.order_id if isinstance(e, Order) else e.user_id, parts)].append((e, None))
        for p in range(parts):
            todo, inbox[p] = inbox[p], []
            events = [e for e, _ in todo]
            for e, applied in zip(events, stores[owner[p]].apply_many(events, [p if s is None else s for _, s in todo])):
                if applied.change is not None:
                    for share in applied.change.shares(sorted({_crc(i, parts) for i in applied.change.item_ids} - {p})):
                        inbox[share.partition].append((share, ROUTED))
    for p in range(parts):
        stores[owner[p]].apply_many([e for e, _ in inbox[p]], [s for _, s in inbox[p]])
    whole = GraphStore(GraphConfig())
    whole.apply_all(stream)
    union: dict[str, tuple] = {}
    weights: dict[str, float] = {}
    for p in range(parts):
        mine, w = _by_item(stores[owner[p]], whole.last_ts, p)
        union.update(mine)
        weights.update(w)
    expected, expected_weights = _by_item(whole, whole.last_ts)
    assert union == expected and weights.keys() == expected_weights.keys()
    assert np.allclose([weights[k] for k in expected_weights], list(expected_weights.values()), rtol=1e-5, atol=1e-5)  # float32 sums
    assert whole.stats.orders_cancelled == len(orders[1::2]) and whole.stats.duplicates >= len(orders[::2])
    held = sum(len(stores[w].orders) for w in set(owner))  # each stream keeps its own window: some more
    assert held >= len(whole.orders) > 300  # the order logs moved with their partitions
