"""Parts of the stream worker that need no broker: changelog records, publishing."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from streaming.metrics import WorkerMetrics
from streaming.scorer import _Publisher
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


class FakeProducer:
    """Answers sends like aiokafka: a delivery future, or MessageSizeTooLargeError for big values."""

    def __init__(self, max_value: int = 100) -> None:
        self.max_value, self.sent, self.deliveries = max_value, [], []

    async def send(self, topic, key=None, value=None, headers=None):
        if value is not None and len(value) > self.max_value:
            raise MessageSizeTooLargeError("too big")
        self.sent.append((topic, key, value, headers))
        delivery = asyncio.get_running_loop().create_future()
        self.deliveries.append(delivery)
        return delivery


def test_a_refused_record_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> WorkerMetrics:
        metrics = WorkerMetrics()
        producer = FakeProducer()
        publisher = _Publisher("unused", metrics, producer)
        await publisher.send("bundle-updates", b"A", b"{}")
        await publisher.send("bundle-updates", b"B", b"{}")
        producer.deliveries[0].set_result(None)
        producer.deliveries[1].set_exception(KafkaTimeoutError("no answer"))
        await asyncio.sleep(0)  # done-callbacks run on the next loop pass
        return metrics

    with caplog.at_level(logging.ERROR, logger="streaming.worker"):
        metrics = asyncio.run(run())
    assert metrics.value("bundlegnn_worker_publish_failures_total", {"topic": "bundle-updates"}) == 1
    assert "key b'B'" in caplog.text and "no answer" in caplog.text and "b'A'" not in caplog.text


def test_a_dead_letter_too_big_for_a_request_goes_out_without_its_value() -> None:
    async def run() -> FakeProducer:
        producer = FakeProducer(max_value=100)
        publisher = _Publisher("unused", WorkerMetrics(), producer)
        await publisher.send("dead-letters", b"k", b"x" * 500, headers=[("reason", b"not JSON")])
        return producer

    (topic, key, value, headers), = asyncio.run(run()).sent
    assert (topic, key, value) == ("dead-letters", b"k", None)
    assert dict(headers)["reason"] == b"not JSON" and dict(headers)["value-dropped"].startswith(b"500 bytes")
