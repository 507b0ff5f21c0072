"""The Faust stream worker: events in, graph updated, fresh complement lists out.

Agents consume ``catalog`` (keyed by item), ``interactions`` (keyed by user)
and ``orders`` (keyed by order) in micro-batches. Every valid event goes
through :meth:`graph.store.GraphStore.apply_many` — the code path the batch
replay uses — and is recorded in a Faust table with a changelog topic (per
micro-batch and source partition, in records of at most
``changelog_record_bytes``), so a restarted worker recovers exactly the
events it had applied and rebuilds its graph from them. Invalid events,
events that reference nothing and events too big to record go to
``dead-letters`` with the reason and the original bytes; the worker carries
on.

Touched items are refreshed together by a pacing task (every
``refresh_interval``, less often when refreshes would take more than
``refresh_share`` of the worker's time): their complement
lists (:class:`training.complements.ComplementScorer`) are published on
``bundle-updates`` keyed by item. New catalog items get a text embedding and,
when a model is loaded, an inductive GNN pass gives them model views. A
``model-updates`` message (``{"path": ...}``) makes every worker load that
artifact without a restart: each worker reads that topic without a consumer
group, so none misses it.

Scale-out note: the co-purchase graph of a worker holds the orders of the
partitions it owns. One worker owns all of them; several workers each score
from their share of orders (see README, "Scaling").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError, MessageSizeTooLargeError
from faust.exceptions import ConsumerNotStarted

from graph.events import Interaction, ItemUpserted, Order
from graph.snapshot import save as save_snapshot
from graph.store import GraphConfig, GraphStore
from streaming import transport
from streaming.codec import Rejected, decode
from streaming.metrics import WorkerMetrics
from streaming.settings import StreamConfig
from training.artifact import Artifact, load_artifact
from training.complements import ComplementScorer, ScorerConfig
from training.encoder import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """The worker's in-memory graph, scorer and model, and what awaits a refresh."""

    graph_config: GraphConfig
    scorer_config: ScorerConfig
    encoder: TextEncoder | None = None
    device: str = "cpu"
    store: GraphStore = field(init=False)
    scorer: ComplementScorer = field(init=False)
    artifact: Artifact | None = None
    pending: dict[str, float] = field(default_factory=dict)  # item → newest source timestamp
    new_text: set[str] = field(default_factory=set)  # items whose text needs embedding
    needs_embedding: bool = False  # items without a model view exist
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) → next offset to apply

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.store = GraphStore(self.graph_config)
        self.scorer = ComplementScorer(self.store, self.scorer_config)
        if self.artifact is not None:
            self._install(self.artifact)

    def apply(self, event: ItemUpserted | Interaction | Order, source_ts: float | None) -> str | None:
        """Apply one event; return a dead-letter reason when it references nothing."""
        return self.apply_many([event], [source_ts])[0]

    def apply_many(self, events: list[ItemUpserted | Interaction | Order],
                   source_ts: list[float | None]) -> list[str | None]:
        """Apply events in order (one bulk graph update); per event, a dead-letter reason or None."""
        reasons: list[str | None] = []
        now = time.time()
        pending, counter = self.pending, self.metrics.events
        for event, result, ts in zip(events, self.store.apply_many(events), source_ts):
            counter.labels(event.type).inc()
            if isinstance(event, ItemUpserted) and result.changed:
                self.new_text.add(event.item_id)
            if isinstance(event, Order) and event.status == "cancelled" and not result.changed and "unknown" in result.note:
                reasons.append(f"{result.note}: recorded, a late placement of it will be ignored")
            else:
                reasons.append(None)
            if result.changed:
                ts = ts if ts is not None else now
                for item in result.items:
                    if pending.get(item, 0.0) < ts:
                        pending[item] = ts
        return reasons

    # ---- text and model --------------------------------------------------------
    def text_job(self) -> tuple[np.ndarray, list[str]] | None:
        """Rows and texts of items upserted since the last call (None: nothing to encode)."""
        if not self.new_text or self.encoder is None:
            self.new_text.clear()
            return None
        rows = np.array([self.store.items.index[k] for k in sorted(self.new_text)])
        self.new_text.clear()
        return rows, [self.store.catalog[r].text for r in rows]

    def set_text(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        self.scorer.set_text(rows, vectors)
        if self.artifact is not None and any(not self.scorer.has_view(int(r)) for r in rows):
            self.needs_embedding = True  # only items the model has not seen need the inductive pass

    def embed_text(self) -> None:
        """Encode the text of items upserted since the last call (blocking; the worker uses a thread)."""
        job = self.text_job()
        if job is not None and self.encoder is not None:
            self.set_text(job[0], self.encoder.encode(job[1], progress=False))

    def load_model(self, path: str | Path) -> None:
        """Load an artifact and score with it from now on (the hot swap)."""
        artifact = load_artifact(path)
        self.artifact = artifact
        self._install(artifact)
        self.pending.update({k: time.time() for k in self.store.items.ids if self.store.co.nbrs[self.store.items.index[k]]})
        self.metrics.model_loaded.set(time.time())
        log.info("model %s loaded from %s", artifact.version, path)

    def _install(self, artifact: Artifact) -> None:
        self.scorer.set_views(artifact.version, artifact.item_ids, artifact.src, artifact.dst, artifact.prior,
                              artifact.model.temperature, artifact.decoder_rows)
        self.needs_embedding = any(not self.scorer.has_view(r) for r in range(self.store.num_items))

    def inductive_graph(self) -> Any | None:
        """The current graph as GNN input when items lack a model view (None: nothing to do).

        The model is inductive: one pass over the whole current graph gives
        items the artifact has not seen views from their text and neighbours.
        """
        if self.artifact is None or self.encoder is None or not self.needs_embedding:
            return None
        from training.train import Graph

        self.needs_embedding = False
        dim = self.artifact.model.in_channels - 1  # item features: text embedding + log price
        text = np.zeros((self.store.num_items, dim), np.float32)  # items known only from orders: no text yet
        if len(self.scorer.text):
            text[: len(self.scorer.text)] = self.scorer.text
        return Graph.build(self.store, text, torch_device(self.device), id_items=self.artifact.manifest["id_items"])

    def install_views(self, item_ids: list[str], h: dict[str, Any]) -> list[str]:
        """Use the views of an inductive pass; return the items that gained one."""
        assert self.artifact is not None
        before = [r for r in range(len(item_ids)) if not self.scorer.has_view(r)]
        prior = self.artifact.model.prior(h["item"]).squeeze(-1)
        self.scorer.set_views(self.artifact.version, item_ids, h["src"].detach().numpy(), h["dst"].detach().numpy(),
                              prior.detach().numpy(), self.artifact.model.temperature, self.artifact.decoder_rows)
        return [item_ids[r] for r in before]


def torch_device(name: str) -> Any:
    from training.train import select_device

    return select_device(name)


def record_size(raw: bytes) -> int:
    """Bytes an event takes in a changelog record's JSON list (escaped; an upper bound for Faust's encoders)."""
    return len(json.dumps(raw.decode(errors="replace"))) + 2


def changelog_chunks(events: list[tuple[int, int, str, int]], limit: int) -> list[tuple[int, str, list[str]]]:
    """A micro-batch's changelog records ``(partition, key, raw events)`` from its ``(partition, offset, raw,
    size)`` events: per source partition in arrival order, each under ``limit`` bytes.

    The key ``<partition>:<first offset>`` (offset zero-padded) sorts records of a partition in arrival
    order. Kafka refuses a record over the producer's ``max.request.size`` (1 MB by default), and the
    worker would stop: a batch of 2,000 Online Retail orders is about 2.4 MB.
    """
    out: list[tuple[int, str, list[str]]] = []
    open_: dict[int, tuple[list[str], list[int]]] = {}  # partition → (its open record's events, [bytes])
    for partition, offset, raw, size in events:
        current = open_.get(partition)
        if current is None or current[1][0] + size > limit:
            current = open_[partition] = ([], [2])
            out.append((partition, f"{partition}:{offset:020d}", current[0]))
        current[0].append(raw)
        current[1][0] += size
    return out


def _encode(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(texts, progress=False)


def _forward(model: Any, graph: Any) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        return graph.embed(model)


def build_app(stream: StreamConfig, state: WorkerState, bootstrap: str, snapshot: Path | None = None,
              datadir: Path = Path("var/faust")) -> faust.App:
    """The Faust app with its topics, tables, agents and timers (``datadir``: Faust's own files)."""
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        stream.app_id,
        broker=[f"{transport.SCHEME}://{b}" for b in bootstrap.split(",")],
        store="memory://",
        datadir=str(datadir),
        topic_partitions=stream.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=stream.session_timeout,
        broker_heartbeat_interval=stream.heartbeat_interval,
        broker_max_poll_interval=stream.max_poll_interval,
        broker_rebalance_timeout=stream.rebalance_timeout,
        web_enabled=stream.web_port > 0,
        web_port=stream.web_port or 6066,
        table_cleanup_interval=3600.0,
        producer_max_batch_size=stream.producer_max_batch_size,
    )
    app.fetch_max_wait_ms = stream.fetch_max_wait * 1000  # read by streaming.transport's consumer
    names = stream.topics
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    catalog_topic = app.topic(names.catalog, **raw)
    interactions_topic = app.topic(names.interactions, **raw)
    orders_topic = app.topic(names.orders, **raw)
    # Bundle updates and dead letters use a producer of their own: Faust's carries the changelogs,
    # which may be configured to one record per batch (see StreamConfig.producer_max_batch_size).
    out = _Publisher(bootstrap, state.metrics)
    # Changelogged record of every applied event, per micro-batch and source partition: the worker's recoverable
    # state. (Earlier versions kept a list per item or user for catalog events and interactions, rewritten whole
    # on every event; rebuild() reads both layouts.)
    tables = {
        "item_upserted": app.Table("catalog-events", default=list, partitions=stream.partitions),
        "interaction": app.Table("interaction-events", default=list, partitions=stream.partitions),
        "order": app.Table("order-batches", default=list, partitions=stream.partitions),
    }

    async def dead_letter(event: faust.types.EventT, reason: str) -> None:
        msg = event.message
        headers = [("reason", reason.encode()), ("topic", msg.topic.encode()),
                   ("partition", str(msg.partition).encode()), ("offset", str(msg.offset).encode())]
        state.metrics.dead_letters.labels(msg.topic).inc()
        log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, reason)
        await out.send(names.dead_letters, key=msg.key, value=msg.value, headers=headers)

    async def consume(stream_: faust.StreamT, kind: str) -> None:
        """Events in micro-batches, recorded as a few changelog records per batch, not one per event.

        A changelogged table write costs about as much as everything else
        Faust does per event (measured: 15.5k events/s bare, 4.7k/s with one
        write each). So a table is keyed by ``<partition>:<first offset>``
        and each record holds events from one source partition in arrival
        order (:func:`changelog_chunks`), which :func:`rebuild` replays.
        """
        table, limit = tables[kind], stream.changelog_record_bytes
        async for batch in stream_.take_events(stream.batch_size, within=stream.batch_within):
            valid: list[tuple[faust.types.EventT, ItemUpserted | Interaction | Order, int]] = []
            for event in batch:
                state.offsets[event.message.tp[:2]] = event.message.offset + 1
                decoded = decode(event.value, kind)
                if isinstance(decoded, Rejected):
                    await dead_letter(event, decoded.reason)
                elif (size := record_size(event.value)) > limit:
                    await dead_letter(event, f"event of {size} bytes as a changelog entry; the worker records "
                                             f"events up to {limit} (stream.changelog_record_bytes)")
                else:
                    valid.append((event, decoded, size))
            reasons = state.apply_many([e for _, e, _ in valid], [ev.message.timestamp for ev, _, _ in valid])
            for (event, _, _), reason in zip(valid, reasons):
                if reason:
                    await dead_letter(event, reason)
            # the record is the validated message as received: rebuild() decodes it the same way
            for partition, key, values in changelog_chunks(
                    [(ev.message.partition, ev.message.offset, ev.value.decode(), n) for ev, _, n in valid], limit):
                # `table[key] = ...` would log to the partition of the stream's current event; a batch spans
                # partitions, so name each one (changelog partition = source partition, as Faust co-partitions).
                table.send_changelog(partition, key, values)
                table.data[key] = values

    @app.agent(catalog_topic, name="catalog")
    async def catalog(stream_: faust.StreamT) -> None:
        await consume(stream_, "item_upserted")

    @app.agent(interactions_topic, name="interactions")
    async def interactions(stream_: faust.StreamT) -> None:
        await consume(stream_, "interaction")

    @app.agent(orders_topic, name="orders")
    async def orders(stream_: faust.StreamT) -> None:
        await consume(stream_, "order")

    async def rebuild() -> None:
        """After (re)assignment: the graph is exactly the recorded events, replayed."""
        state.reset()
        state.offsets.clear()  # positions of the new assignment: see lag()
        events: list[ItemUpserted | Interaction | Order] = []
        for kind in ("item_upserted", "interaction"):
            events += [decode(raw_, kind) for _, values in sorted(tables[kind].items()) for raw_ in values]
        events.sort(key=lambda e: e.epoch)  # stable: ties keep their arrival order within a partition
        for _, values in sorted(tables["order"].items()):  # per partition, in arrival order: cancellations keep
            events += [decode(raw_, "order") for raw_ in values]  # their meaning
        state.apply_many(events, [None] * len(events))
        state.embed_text()
        state.pending = {k: 0.0 for k in state.pending}  # publish the rebuilt lists, no latency to report
        log.info("graph rebuilt from changelogs: %d events, %d items, %d co-purchase edges",
                 len(events), state.store.num_items, state.store.num_co_edges())

    tables["order"].on_recover(rebuild)

    @app.task
    async def refresher() -> None:
        """Refresh, pause, repeat: the pause is ``refresh_interval``, or longer when refreshes take long.

        Under load an item is touched by many events between two refreshes,
        and one refresh then serves them all: the pause grows so refreshing
        takes at most ``refresh_share`` of the worker's time and the rest
        goes to applying events.
        """
        share = stream.refresh_share
        while True:
            started = time.perf_counter()
            await refresh()
            took = time.perf_counter() - started
            await asyncio.sleep(max(stream.refresh_interval, took * (1 - share) / share))

    async def refresh() -> None:
        """Publish fresh complement lists of the items touched since the last refresh."""
        job = state.text_job()
        if job is not None and state.encoder is not None:  # the encoder runs in a thread: heartbeats go on
            vectors = await asyncio.get_running_loop().run_in_executor(None, _encode, state.encoder, job[1])
            state.set_text(job[0], vectors)
        if not state.pending:
            return
        started = time.perf_counter()
        pending, state.pending = state.pending, {}
        m = state.metrics
        for n, (item, ts) in enumerate(pending.items()):
            await out.send(names.bundle_updates, key=item.encode(), value=state.scorer.update_json(item, ts or None))
            if ts:
                m.event_to_update.observe(time.time() - ts)
            if n % 50 == 49:  # a model swap refreshes every item: let heartbeats and fetches run in between
                await asyncio.sleep(0)
        m.updates.inc(len(pending))
        m.refresh_seconds.observe(time.perf_counter() - started)

    async def lag() -> dict[str, int]:
        """Events not yet applied per event topic (high-water mark minus the next offset to apply).

        A partition with no event applied since its assignment counts from
        the consumer's position (its committed offset, as nothing was
        fetched): counting from 0 made a restarted worker report the whole
        topic as lag until new events came.
        """
        behind: dict[str, int] = {}
        for tp in app.consumer.assignment():
            if tp.topic not in (names.catalog, names.interactions, names.orders):
                continue
            high = app.consumer.highwater(tp)
            if tp[:2] not in state.offsets:
                position = await app.consumer.position(tp)
                if position is None or tp[:2] in state.offsets:
                    continue
                state.offsets[tp[:2]] = position
            if high is not None:
                behind[tp.topic] = behind.get(tp.topic, 0) + max(0, high - state.offsets[tp[:2]])
        return behind

    @app.timer(stream.metrics_interval)
    async def measure() -> None:
        """Consumer lag per event topic and graph size."""
        try:
            behind = await lag()
        except (ConsumerNotStarted, ConsumerStoppedError, KafkaError) as exc:  # starting, rebalancing or stopping: the next tick measures
            log.info("consumer lag not measured: %r", exc)
            behind = {}
        for topic_name, count in behind.items():
            state.metrics.lag.labels(topic_name).set(count)
        state.metrics.items.set(state.store.num_items)
        state.metrics.co_edges.set(state.store.num_co_edges())

    @app.timer(stream.embed_interval)
    async def embed_new_items() -> None:
        graph = state.inductive_graph()
        if graph is None or state.artifact is None:
            return
        item_ids, model = list(state.store.items.ids), state.artifact.model
        h = await asyncio.get_running_loop().run_in_executor(None, _forward, model, graph)
        for item in state.install_views(item_ids, h):
            state.pending.setdefault(item, time.time())

    @app.task
    async def model_updates() -> None:
        """Read ``model-updates`` from its end without a consumer group: every worker loads every model."""
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = await _partitions(consumer, names.model_updates)
            tps = [TopicPartition(names.model_updates, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        await _swap(record.value)
        finally:
            await consumer.stop()

    async def _swap(value: bytes) -> None:
        try:
            path = json.loads(value)["path"]
            state.load_model(path)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.error("model-updates message refused (%s): %r", exc, value[:200])

    @app.on_before_shutdown.connect
    async def close_publisher(*_: Any, **__: Any) -> None:
        await out.stop()

    async def save_state(*_: Any, **__: Any) -> None:
        if snapshot is not None:
            save_snapshot(state.store, snapshot)
            log.info("graph snapshot written to %s", snapshot)

    app.on_before_shutdown.connect(save_state)
    return app


class _Publisher:
    """An aiokafka producer started on first use (it needs the running event loop).

    Sends are not awaited one by one (that would cost a round trip each);
    a record Kafka refuses is logged and counted when its answer comes. A
    dead letter too big for a request goes out without its value: its
    headers say where the original is.
    """

    def __init__(self, bootstrap: str, metrics: WorkerMetrics, producer: Any = None) -> None:
        self.bootstrap = bootstrap
        self.metrics = metrics
        self.producer: AIOKafkaProducer | None = producer
        self.lock = asyncio.Lock()

    async def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list | None = None) -> None:
        if self.producer is None:
            async with self.lock:
                if self.producer is None:
                    producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, max_batch_size=1 << 20)
                    await producer.start()
                    self.producer = producer
        try:
            delivery = await self.producer.send(topic, key=key, value=value, headers=headers)
        except MessageSizeTooLargeError as exc:
            if headers is None or value is None:  # not a dead letter: nothing to fall back on
                self._failed(topic, key, exc)
                return
            log.error("dead letter of %d bytes too big to publish; sent without its value", len(value))
            headers = [*headers, ("value-dropped", f"{len(value)} bytes, over the producer's request size".encode())]
            delivery = await self.producer.send(topic, key=key, value=None, headers=headers)
        delivery.add_done_callback(lambda done: self._answered(topic, key, done))

    def _answered(self, topic: str, key: bytes | None, delivery: asyncio.Future) -> None:
        if not delivery.cancelled() and delivery.exception() is not None:
            self._failed(topic, key, delivery.exception())

    def _failed(self, topic: str, key: bytes | None, exc: BaseException) -> None:
        self.metrics.publish_failures.labels(topic).inc()
        log.error("publishing to %s (key %r) failed: %r", topic, key, exc)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()  # flushes what is buffered
            self.producer = None


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    for _ in range(50):
        if topic in await consumer.topics():  # refreshes metadata: the topic may be created after the worker starts
            return sorted(consumer.partitions_for_topic(topic) or ())
        await asyncio.sleep(0.2)
    raise RuntimeError(f"topic {topic!r} does not exist")
