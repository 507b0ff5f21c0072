"""The scoring process's Kafka producer: bundle updates, dead letters and repartition records out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from streaming.metrics import WorkerMetrics
from streaming.settings import PLAINTEXT, KafkaSecurity

log = logging.getLogger(__name__)


class Publisher:
    """An aiokafka producer started on first use (it needs the running event loop).

    Sends are not awaited one by one (that would cost a round trip each);
    a record Kafka refuses is logged and counted when its answer comes. A
    dead letter too big for a request goes out without its value: its
    headers say where the original is.

    A record counts as delivered once every in-sync replica has it
    (``acks="all"``): a checkpoint covers the orders a repartition record
    carries to another task, so a record the leader acknowledged alone and
    lost in a failover would lose those counts (with aiokafka's default,
    ``acks=1``). Resends after a retry are harmless: a task skips a
    repartition record it has applied (its source position), and the
    newest bundle update of an item is the one served.
    """

    def __init__(self, bootstrap: str, metrics: WorkerMetrics, producer: Any = None,
                 must_deliver: frozenset[str] = frozenset(), security: KafkaSecurity = PLAINTEXT) -> None:
        self.bootstrap = bootstrap
        self.security = security
        self.metrics = metrics
        self.must_deliver = must_deliver  # topics whose records a checkpoint may not cover undelivered
        self.lost = 0  # records of those topics that failed
        self.producer: AIOKafkaProducer | None = producer
        self.lock = asyncio.Lock()
        self.delivered: dict[tuple[str, int], int] = {}  # (topic, partition) → offset after the last delivered

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list | None = None,
                   droppable: bool = False, partition: int | None = None) -> None:
        """``droppable``: the value may be left out when too big (a dead letter: its headers say where it is);
        ``partition``: the partition to write to (default: by key)."""
        if self.producer is None:
            async with self.lock:
                if self.producer is None:
                    producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                                max_batch_size=1 << 20, **self.security.client_options())
                    await producer.start()
                    self.producer = producer
        try:
            where = {} if partition is None else {"partition": partition}
            delivery = await self.producer.send(topic, key=key, value=value, headers=headers, **where)
        except MessageSizeTooLargeError as exc:
            if not droppable or value is None:  # nothing to fall back on
                self._failed(topic, key, exc)
                return
            log.error("dead letter of %d bytes too big to publish; sent without its value", len(value))
            dropped = f"{len(value)} bytes, over the producer's request size".encode()
            headers = [*(headers or []), ("value-dropped", dropped)]
            delivery = await self.producer.send(topic, key=key, value=None, headers=headers)
        delivery.add_done_callback(lambda done: self._answered(topic, key, done))

    def _answered(self, topic: str, key: bytes | None, delivery: asyncio.Future) -> None:
        if not delivery.cancelled() and delivery.exception() is not None:
            self._failed(topic, key, delivery.exception())
        elif not delivery.cancelled():
            meta = delivery.result()
            at = (meta.topic, meta.partition)
            self.delivered[at] = max(self.delivered.get(at, 0), meta.offset + 1)

    def _failed(self, topic: str, key: bytes | None, exc: BaseException) -> None:
        self.metrics.publish_failures.labels(topic).inc()
        log.error("publishing to %s (key %r) failed: %r", topic, key, exc)
        if topic in self.must_deliver:
            self.lost += 1

    async def flush(self) -> None:
        """Wait until every record sent so far is delivered (or has failed, and was logged and counted)."""
        if self.producer is not None:
            await self.producer.flush()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()  # flushes what is buffered
            self.producer = None
