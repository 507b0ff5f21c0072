"""How the worker cuts a micro-batch into changelog records (no broker needed)."""

from __future__ import annotations

import json

from streaming.worker import changelog_chunks, record_size


def test_records_keep_partition_order_and_stay_under_the_limit() -> None:
    raws = [json.dumps({"order_id": f"o{n}", "note": "é" * (n % 5)}) for n in range(40)]
    events = [(n % 3, 100 + n, raw, record_size(raw.encode())) for n, raw in enumerate(raws)]
    chunks = changelog_chunks(events, limit=200)
    # every event once, and each partition's events in arrival order across its records
    for partition in range(3):
        got = [raw for p, key, values in sorted(chunks, key=lambda c: c[1]) if p == partition for raw in values]
        assert got == [raw for p, _, raw, _ in events if p == partition]
    for partition, key, values in chunks:
        assert len(json.dumps(values)) <= 200  # what Faust's JSON encoder writes, at most
        first = next(o for p, o, raw, _ in events if raw == values[0])
        assert key == f"{partition}:{first:020d}"
    assert len(chunks) > 3  # the limit forced several records per partition


def test_one_record_per_partition_when_the_batch_fits() -> None:
    events = [(1, 7, '{"a":1}', 11), (0, 3, '{"b":2}', 11), (1, 8, '{"c":3}', 11)]
    assert changelog_chunks(events, limit=1000) == [(1, "1:00000000000000000007", ['{"a":1}', '{"c":3}']),
                                                    (0, "0:00000000000000000003", ['{"b":2}'])]


def test_record_size_counts_escaping() -> None:
    raw = '{"title": "5\\" plate", "x": "é"}'.encode()
    assert record_size(raw) == len(json.dumps(raw.decode())) + 2 > len(raw)
    assert changelog_chunks([], 1024) == []
