"""Faust's aiokafka transport with a configurable fetch wait and a fetcher that looks again within 50 ms.

* Fetch wait (``stream.fetch_max_wait``): Faust builds its consumer with
  ``fetch_max_wait_ms=1500`` and no setting to change it. Kafka answers a
  fetch as soon as data is there, so the wait only bounds an idle
  long-poll; the embedded tansu broker holds every fetch for part of that
  wait instead (measured: a message waited 367 ms at the median with
  1500 ms, 24 ms with 100 ms), which was most of the worker's event →
  update latency.
* Looks for records: when no partition can be fetched (none assigned yet,
  or every stream buffer full behind a busy agent) Faust's fetcher sleeps
  one second, and otherwise it long-polls the fetchable partitions for up
  to one second, so a partition that becomes fetchable meanwhile (a stream
  buffer drained, recovery ended) waits for that second. A draining worker
  sat idle for 0.3–1 s in most runs with thousands of events on the
  broker, and a restarted one started a second late in half of them. Here
  a look waits at most ``Consumer.IDLE_POLL`` (50 ms): 10× bench drain
  4,400–5,100 → 6,400–8,100 orders/s.

* Offsets from the checkpoint: an app with a ``checkpoint_offsets``
  callable (:func:`streaming.worker.build_app`) commits only the offsets of
  the worker's current checkpoint, whatever Faust has acknowledged, and on
  (re)assignment seeks its event partitions to them instead of to the
  committed offsets (which may be older, or another worker's): the
  consumer then reads exactly what the checkpointed state has not applied
  (see :mod:`streaming.checkpoint`).

Apps built by :func:`streaming.worker.build_app` use the
``bundlegnn+kafka://`` scheme, registered here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

Offsets = Callable[[], dict[tuple[str, int], int]]

SCHEME = "bundlegnn+kafka"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    """Creates the worker consumer with the app's ``fetch_max_wait_ms``."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor argument here and hands it to its fetcher at start()
        consumer._fetch_max_wait_ms = int(getattr(self.app, "fetch_max_wait_ms", 1500))
        return consumer

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek each assigned partition the checkpoint knows to its offset there, the others to the beginning
        (the checkpointed state holds nothing of them); without a checkpoint, to the committed offsets."""
        held: Offsets | None = getattr(self.app, "checkpoint_offsets", None)
        if held is None:
            return await super().seek_to_committed()
        return await self.call_thread(self._seek_to_checkpoint, held())

    async def _seek_to_checkpoint(self, held: dict[tuple[str, int], int]) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        positions: dict[TP, int] = {}
        for tp in consumer.assignment():
            offset = held.get((tp.topic, tp.partition))
            if offset is None:
                await consumer.seek_to_beginning(tp)
                offset = await consumer.position(tp)
            else:
                consumer.seek(tp, offset)
            positions[TP(tp.topic, tp.partition)] = offset
        return positions


class Consumer(driver.Consumer):
    IDLE_POLL = 0.05  # longest wait of one look for records, in seconds (Faust's: 1 s)

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Faust's commits (on acknowledgements, rebalances, stop) commit the checkpoint's offsets instead."""
        if getattr(self.app, "checkpoint_offsets", None) is None:
            return await super()._commit(offsets)
        return await self.commit_checkpoint()

    async def commit_checkpoint(self) -> bool:
        """Commit the current checkpoint's offsets of the assigned partitions."""
        held: Offsets = self.app.checkpoint_offsets
        assigned = self.assignment()
        offsets = {tp: offset for (topic, partition), offset in held().items() if (tp := TP(topic, partition)) in assigned}
        return await self._thread.commit(offsets) if offsets else True

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _wait_next_records(self, timeout: float) -> Any:
        if self.flow_active and not self.app.client_only and not self._get_active_partitions():
            await self.sleep(self.IDLE_POLL)  # Faust sleeps 1 s here, however soon a partition becomes fetchable
            return {}, set()
        return await super()._wait_next_records(min(timeout, self.IDLE_POLL))


class Transport(driver.Transport):
    Consumer = Consumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
