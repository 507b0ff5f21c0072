"""Keeps a :class:`~serving.view.BundleView` current from Kafka, in a background thread.

Every API replica reads the whole of its topics from the beginning without a
consumer group (each replica needs all of it; none commits offsets), then
follows them. It is *ready* once it has read up to the end offsets it saw at
start-up. Messages it cannot parse are counted and logged, never applied:
the stream worker already dead-letters bad events, and a bad bundle update
must not replace a good list.

Staleness (:meth:`ViewFeed.stale`, on ``/healthz``): every few seconds the
feed compares its positions with the topics' end offsets. It is stale when
it is behind and has not advanced for ``stale_after`` seconds, once an end
offset went below one seen before (a broker that came back without its data),
when the broker has been unreachable that long, or when its loop has not
polled that long (a handler stuck).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from pydantic import ValidationError

from graph.events import Interaction, ItemUpserted, Order
from serving.view import BundleView
from training.complements import BundleUpdate, signed

log = logging.getLogger(__name__)


class FeedTopics:
    """The topic names the feed reads (passed in by the composition root)."""

    def __init__(self, catalog: str, bundle_updates: str, orders: str | None = None,
                 interactions: str | None = None) -> None:
        self.catalog, self.bundle_updates, self.orders, self.interactions = catalog, bundle_updates, orders, interactions


class ViewFeed:
    """Consumes catalog, bundle-update and (for user histories) order/interaction topics into a view."""

    def __init__(self, view: BundleView, bootstrap: str, topics: FeedTopics,
                 on_update: Callable[[BundleUpdate, float], None] | None = None,
                 on_ready: Callable[[], None] | None = None, fetch_max_wait: float = 0.05,
                 stale_after: float = 60.0, check_every: float = 5.0, signing_key: bytes | None = None,
                 kafka_options: Mapping[str, Any] | None = None) -> None:
        self.view, self.bootstrap, self.topics = view, bootstrap, topics
        self.kafka_options = dict(kafka_options or {})  # TLS and SASL (stream.security), from the composition root
        self.signing_key = signing_key  # set: bundle updates without the worker's signature are not served
        self.stale_after, self.check_every = stale_after, check_every
        now = time.time()
        self.beat = now  # the loop's last poll
        self.fresh_at = now  # the last check that found the view caught up or advancing
        self.checked_at = 0.0
        self.behind: int | None = None  # messages on the topics after the view's positions, at the last check
        self.went_back: str | None = None  # a partition whose end offset fell below the highest one seen
        self.unreachable_since: float | None = None
        self._positions: dict = {}
        self._ends: dict = {}  # the highest end offset seen per partition
        self.fetch_max_wait_ms = int(fetch_max_wait * 1000)  # see StreamConfig.fetch_max_wait
        self.on_update, self.on_ready = on_update, on_ready
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="view-feed", daemon=True)
        self._handlers: dict[str, Callable[[ConsumerRecord], None]] = {topics.catalog: self._catalog,
                                                              topics.bundle_updates: self._update}
        if topics.orders:
            self._handlers[topics.orders] = self._order
        if topics.interactions:
            self._handlers[topics.interactions] = self._interaction

    def start(self) -> "ViewFeed":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stale(self, now: float | None = None) -> str | None:
        """Why the view is not keeping up with its topics (None: it is, or it is still starting)."""
        if not self.ready.is_set():
            return None
        now = time.time() if now is None else now
        if now - self.beat > self.stale_after:
            return f"view feed stuck: no poll for {now - self.beat:.0f} s"
        if self.went_back is not None:
            return f"{self.went_back}: the broker's end offset went back (it lost its data?); restart the API"
        if self.unreachable_since is not None and now - self.unreachable_since > self.stale_after:
            return f"broker unreachable for {now - self.unreachable_since:.0f} s"
        if self.behind and now - self.fresh_at > self.stale_after:
            return f"view {self.behind} messages behind its topics, not advancing for {now - self.fresh_at:.0f} s"
        return None

    def check(self, consumer: KafkaConsumer, parts: list[TopicPartition], now: float) -> None:
        """Compare positions with end offsets (see :meth:`stale`)."""
        self.checked_at = now
        try:
            ends = consumer.end_offsets(parts)
        except KafkaError as exc:
            if self.unreachable_since is None:
                self.unreachable_since = now
                log.warning("view feed cannot read end offsets: %s", exc)
            return
        self.unreachable_since = None
        positions = {tp: consumer.position(tp) for tp in parts}
        # an end offset below the last one seen: the broker lost records (not "below our position": tansu
        # reports ends a record short after multi-record batches)
        back = [tp for tp in parts if ends.get(tp, 0) < self._ends.get(tp, 0)]
        if back:
            self.went_back = f"{back[0].topic}[{back[0].partition}]"
        self._ends = {tp: max(ends.get(tp, 0), self._ends.get(tp, 0)) for tp in parts}
        self.behind = sum(max(0, ends.get(tp, 0) - positions[tp]) for tp in parts)
        if not self.behind or positions != self._positions:
            self.fresh_at = now
        self._positions = positions

    # ---- message handlers ----------------------------------------------------
    def _reject(self, topic: str, exc: Exception) -> None:
        self.view.counters["rejected"] += 1
        log.warning("skipped a message on %s: %s", topic, str(exc).splitlines()[0])

    def _catalog(self, record: ConsumerRecord) -> None:
        self.view.upsert_item(ItemUpserted.model_validate_json(record.value))

    def _update(self, record: ConsumerRecord) -> None:
        if self.signing_key is not None and not signed(self.signing_key, record.key, record.value,
                                                       dict(record.headers or ()).get("signature")):
            raise ValueError(f"bundle update for key {record.key!r} without a valid signature (stream.signing_key)")
        update = BundleUpdate.model_validate_json(record.value)
        now = time.time()
        self.view.apply_update(update, now)
        if self.on_update is not None:
            self.on_update(update, now)

    def _order(self, record: ConsumerRecord) -> None:
        order = Order.model_validate_json(record.value)
        if order.user_id and order.status == "placed":
            self.view.add_user_items(order.user_id, order.item_ids)

    def _interaction(self, record: ConsumerRecord) -> None:
        event = Interaction.model_validate_json(record.value)
        if event.kind in ("cart", "purchase"):
            self.view.add_user_items(event.user_id, [event.item_id])

    # ---- the loop ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._consume()
        except Exception as exc:  # the API reports it on /healthz; it must not die unseen
            self.error = exc
            log.exception("view feed stopped")

    def _consume(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20,
                                 fetch_max_wait_ms=self.fetch_max_wait_ms, **self.kafka_options)
        try:
            parts = []
            for topic in self._handlers:
                found = consumer.partitions_for_topic(topic)
                if not found:
                    raise RuntimeError(f"topic {topic!r} does not exist on {self.bootstrap}")
                parts += [TopicPartition(topic, p) for p in sorted(found)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            target = {tp: end for tp, end in consumer.end_offsets(parts).items() if end > 0}
            while not self._stop.is_set():
                self.beat = now = time.time()
                if self.ready.is_set() and now - self.checked_at >= self.check_every:
                    self.check(consumer, parts, now)
                for tp, records in consumer.poll(timeout_ms=200, max_records=5000).items():
                    handle = self._handlers[tp.topic]
                    for record in records:
                        try:
                            handle(record)
                        except (ValidationError, ValueError) as exc:
                            self._reject(tp.topic, exc)
                if not self.ready.is_set():
                    target = {tp: end for tp, end in target.items() if consumer.position(tp) < end}
                    if not target:
                        if self.on_ready is not None:
                            self.on_ready()
                        self.ready.set()
                        log.info("view caught up: %d items, %d complement lists", len(self.view.items),
                                 len(self.view.entries))
        finally:
            consumer.close()
