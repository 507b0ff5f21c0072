"""Property-based: no message stops the one code path from bytes to graph (``parse_event`` → ``GraphStore``).

Messages are drawn from the event schemas and then mutated the ways a hostile
producer would: a field replaced by any JSON value (deep nesting, huge or
non-finite numbers, control characters), a field dropped or added, times far
in the past or future, orders with more items than ``graph.max_order_items``,
raw bytes that are not UTF-8 or JSON, null values. Each must be applied or
refused with a reason, never raise, and leave the store taking the next good
order exactly as before.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graph.events import MAX_EVENT_BYTES, ItemUpserted, Order, Rejected, parse_event
from graph.store import GraphConfig, GraphStore

KINDS = ("item_upserted", "interaction", "order")
NOW = datetime.now(timezone.utc)
ids = st.text(st.characters(codec="utf-8"), min_size=0, max_size=12)
times = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(timezone.utc)),
    st.just(NOW - timedelta(days=3)), st.just(NOW + timedelta(days=400)),
).map(lambda d: d.isoformat())
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**30), max_value=10**30))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


def _lines(draw: st.DrawFn) -> list[dict]:
    count = draw(st.one_of(st.integers(0, 6), st.just(40)))  # 40: over the store's cap of 30 below
    return [{"item_id": draw(st.sampled_from(["a", "b", "c", ""]) | ids) if n < 6 else f"bulk-{n}",
             "quantity": draw(st.integers(-2, 5)), "price": draw(st.none() | numbers)} for n in range(count)]


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """A topic's kind and a message value: from the schema, then mutated."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "item_upserted":
        obj: dict = {"item_id": draw(ids), "title": draw(st.text(max_size=30)), "price": draw(st.none() | numbers),
                     "in_stock": draw(st.booleans()), "ts": draw(times)}
    elif kind == "interaction":
        obj = {"user_id": draw(ids), "item_id": draw(ids), "kind": draw(st.sampled_from(["view", "cart", "buy"])),
               "ts": draw(times)}
    else:
        obj = {"order_id": draw(ids), "user_id": draw(st.none() | ids), "items": _lines(draw),
               "status": draw(st.sampled_from(["placed", "cancelled", "lost"])), "ts": draw(times)}
    for _ in range(draw(st.integers(0, 2))):  # mutations
        how = draw(st.sampled_from(["replace", "drop", "add", "deep"]))
        key = draw(st.sampled_from(sorted(obj)))
        if how == "replace":
            obj[key] = draw(json_values)
        elif how == "drop":
            obj.pop(key)
        elif how == "add":
            obj[draw(st.text(max_size=6))] = draw(json_values)
        else:
            obj[key] = json.loads("[" * 200 + "]" * 200)
    if draw(st.booleans()):
        obj["type"] = draw(st.sampled_from(KINDS + ("refund",)))
    raw = json.dumps(obj, allow_nan=True).encode()
    tail = draw(st.sampled_from(["none", "none", "none", "bytes", "null", "truncate", "huge"]))
    if tail == "bytes":
        raw = draw(st.binary(max_size=64))
    elif tail == "null":
        return kind, None
    elif tail == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif tail == "huge":
        raw = raw + b" " * MAX_EVENT_BYTES
    return kind, raw


def _store() -> GraphStore:
    store = GraphStore(GraphConfig(max_order_items=30))
    for n, item in enumerate(["a", "b", "c"]):
        store.apply(ItemUpserted(item_id=item, title=f"item {item}", ts=NOW - timedelta(days=10 - n)))
    return store


def _good_order_counts(store: GraphStore, order_id: str) -> int:
    before = store.co_purchase("a", "b")
    result = store.apply(Order(order_id=order_id, items=[{"item_id": "a"}, {"item_id": "b"}],
                               ts=NOW - timedelta(days=1)))
    after = store.co_purchase("a", "b")
    assert result.changed and after is not None
    return after.count - (before.count if before is not None else 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(messages(), min_size=1, max_size=5))
def test_no_message_stops_the_path_from_bytes_to_graph(batch: list[tuple[str, bytes | None]]) -> None:
    store = _store()
    for kind, raw in batch:
        parsed = parse_event(raw, kind)  # never raises
        if isinstance(parsed, Rejected):
            assert parsed.reason and len(parsed.raw) <= max(MAX_EVENT_BYTES, 1024)
            continue
        assert parsed.type == kind
        result = store.apply_many([parsed])[0]  # never raises either: applied, a no-op, or refused with a reason
        assert not result.rejected or result.note
        if isinstance(parsed, Order) and len({line.item_id for line in parsed.items}) > 30:
            assert store.co_purchase("bulk-6", "bulk-7") is None  # over the cap: no pairs
        for item in store.items.ids:  # every weight stays a finite number
            tally = store.co_purchase("a", item)
            assert tally is None or (math.isfinite(tally.weight) and tally.count >= 0)
    assert _good_order_counts(store, "the-next-good-order") == 1
