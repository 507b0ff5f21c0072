"""The wire format: good events parse, bad ones come back as reasons, never raise."""

from __future__ import annotations

import json

import pytest

from graph.events import Interaction, ItemUpserted, Order
from streaming.codec import Rejected, decode, encode

GOOD_ORDER = {
    "type": "order", "order_id": "o1", "user_id": "u1", "ts": "2024-01-01T10:00:00",
    "items": [{"item_id": "A", "quantity": 2, "price": 1.5}, {"item_id": "B"}],
}


def test_good_events_round_trip() -> None:
    order = decode(json.dumps(GOOD_ORDER))
    assert isinstance(order, Order)
    assert order.item_ids == ["A", "B"]
    assert order.items[1].quantity == 1
    assert order.ts.tzinfo is not None and order.ts.utcoffset().total_seconds() == 0
    assert decode(encode(order)) == order
    weighed = decode(json.dumps({**GOOD_ORDER, "items": [{"item_id": "apples", "quantity": 0.35}]}))
    assert isinstance(weighed, Order) and weighed.items[0].quantity == 0.35  # goods sold by weight

    item = decode(b'{"type":"item_upserted","item_id":"A","title":"Red mug","price":2.5,"ts":"2024-01-01T00:00:00Z"}')
    assert isinstance(item, ItemUpserted) and item.in_stock and item.description == ""
    inter = decode('{"user_id":"u","item_id":"A","kind":"cart","ts":1704067200}', expected="interaction")
    assert isinstance(inter, Interaction) and inter.kind == "cart"
    assert inter.epoch == 1704067200.0


def test_timezones_are_normalised_to_utc() -> None:
    a = decode('{"type":"interaction","user_id":"u","item_id":"A","kind":"view","ts":"2024-01-01T12:00:00+02:00"}')
    assert isinstance(a, Interaction)
    assert a.ts.hour == 10 and a.epoch == 1704103200.0


@pytest.mark.parametrize(
    ("raw", "expected", "reason"),
    [
        (b"\xff\xfe", None, "not JSON"),
        (b"{not json", None, "not JSON"),
        (b"[1, 2]", None, "not a JSON object but list"),
        (b'{"type":"refund","ts":"2024-01-01"}', None, "does not match any of the expected tags"),
        (json.dumps({**GOOD_ORDER, "items": []}).encode(), None, "items: List should have at least 1 item"),
        (json.dumps({**GOOD_ORDER, "items": [{"item_id": "A", "quantity": -1}]}).encode(), None,
         "items.0.quantity: Input should be greater than 0"),
        (json.dumps({**GOOD_ORDER, "items": [{"item_id": "A", "quantity": 0}]}).encode(), None,
         "items.0.quantity: Input should be greater than 0"),
        (b'{"type":"order","order_id":"o","ts":0,"items":[{"item_id":"A","quantity":Infinity}]}', None,
         "items.0.quantity: Input should be a finite number"),
        (json.dumps({**GOOD_ORDER, "order_id": ""}).encode(), None, "order_id: String should have at least 1"),
        (json.dumps({**GOOD_ORDER, "ts": "yesterday"}).encode(), None, "ts: Input should be a valid datetime"),
        (json.dumps({**GOOD_ORDER, "colour": "red"}).encode(), None, "colour: Extra inputs are not permitted"),
        (b'{"type":"interaction","user_id":"u","item_id":"A","kind":"like","ts":0}', None, "kind: Input should be"),
        (b'{"item_id":"A","title":"x","price":-3,"ts":0}', "item_upserted", "price: Input should be greater than or equal to 0"),
        (b'{"item_id":"A","title":"x","price":NaN,"ts":0}', "item_upserted", "price: Input should be a finite number"),
        (json.dumps(GOOD_ORDER).encode(), "interaction", "type 'order' on a topic for 'interaction' events"),
    ],
)
def test_bad_events_are_values_with_reasons(raw: bytes, expected: str | None, reason: str) -> None:
    result = decode(raw, expected=expected)
    assert isinstance(result, Rejected)
    assert reason in result.reason
    assert result.raw == raw


@pytest.mark.parametrize("expected", [None, "order"])
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "a null message value (a tombstone)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (json.dumps({**GOOD_ORDER, "note": "x" * (2 << 20)}).encode(), "at most 1,048,576 bytes"),
        (json.dumps({**GOOD_ORDER, "ts": "9999-12-31T00:00:00"}).encode()[:-1] + b"\x00", "not JSON"),
    ],
)
def test_hostile_messages_are_rejected_not_raised(raw: bytes | None, reason: str, expected: str | None) -> None:
    """What a broken or hostile producer can put on a topic: each is a dead letter with its reason, and the
    good event after it still parses (the parser keeps no state that a bad one could break)."""
    result = decode(raw, expected=expected)
    assert isinstance(result, Rejected) and reason in result.reason, result
    assert len(result.raw) <= max(len(raw or b""), 1024) and (raw is None or len(raw) <= 1 << 20
                                                              or len(result.raw) == 1024)
    assert isinstance(decode(json.dumps(GOOD_ORDER).encode(), expected=expected), Order)


def test_times_before_the_unix_epoch_are_rejected() -> None:
    assert isinstance(decode(json.dumps({**GOOD_ORDER, "ts": "1970-01-01T00:00:00Z"}).encode()), Order)
    result = decode(json.dumps({**GOOD_ORDER, "ts": "0001-01-02T00:00:00"}).encode())
    assert isinstance(result, Rejected) and "before 1970-01-01, the earliest time accepted" in result.reason
