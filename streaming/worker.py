"""The Faust side of the stream worker: events in, validated, handed to the scoring process.

Agents consume ``catalog`` (keyed by item), ``interactions`` (keyed by user)
and ``orders`` (keyed by order) in micro-batches and forward every valid
event, in arrival order, to the worker's scoring process
(:mod:`streaming.scorer`), which applies it to the graph through
:meth:`graph.store.GraphStore.apply_many` — the code path the batch replay
uses — and publishes fresh complement lists on ``bundle-updates``. Invalid
events go there too, as dead letters with the reason and the original bytes
(events that reference nothing are found, and dead-lettered, by the scoring
process); the worker carries on.

State and recovery: the scoring process checkpoints its graph with the
input offsets it reflects (:mod:`streaming.checkpoint`). The consumer
commits only the current checkpoint's offsets and, when partitions are
(re)assigned, seeks to them (:mod:`streaming.transport`), so a restarted
worker reads again exactly what came after its checkpoint.

Scale-out: the consumer group gives each worker a set of tasks — partition
``p`` of every input topic, ``repartition`` included (Faust assigns the same
partition numbers of topics with as many partitions to one member) — and
the scoring process holds those tasks' share of the graph; orders reach
the tasks owning their items through ``repartition``
(:mod:`streaming.repartition`). The assignment goes to the scoring process
as ``revoke`` and ``assign`` commands, in order with the records.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import ConsumerStoppedError, KafkaError
from faust.exceptions import ConsumerNotStarted

from streaming import checkpoint, repartition, transport
from graph.store import GraphEvent
from streaming.codec import Rejected, decode, graph_input
from streaming.scorer import Record, ScorerLink
from streaming.settings import KafkaSecurity, StreamConfig

log = logging.getLogger(__name__)


def broker_credentials(security: KafkaSecurity) -> faust.types.CredentialsT | None:
    """``stream.security`` as Faust's credentials, which Faust turns into the same aiokafka options for its
    consumer, producer and topic admin as :meth:`~streaming.settings.KafkaSecurity.client_options` gives the
    scoring process (None: plaintext)."""
    context = security.ssl_context()
    if security.uses_sasl:
        assert security.sasl_password is not None  # checked by KafkaSecurity
        return faust.SASLCredentials(username=security.sasl_username,
                                     password=security.sasl_password.get_secret_value(),
                                     ssl_context=context, mechanism=security.sasl_mechanism)
    return faust.SSLCredentials(context) if context is not None else None


def build_app(stream: StreamConfig, scorer: ScorerLink, bootstrap: str, datadir: Path = Path("var/faust"),
              checkpoints: Path | None = None) -> faust.App:
    """The Faust app with its topics, agents and timers (``datadir``: Faust's own files; ``checkpoints``: the
    scoring process's checkpoint directory, whose offsets the consumer commits and seeks to)."""
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        stream.app_id,
        broker=[f"{transport.SCHEME}://{b}" for b in bootstrap.split(",")],
        broker_credentials=broker_credentials(stream.security),
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
    )
    app.fetch_max_wait_ms = stream.fetch_max_wait * 1000  # read by streaming.transport's consumer
    if checkpoints is not None:  # read by streaming.transport's consumer when it commits and when it seeks
        app.checkpoint_offsets = lambda: checkpoint.offsets(checkpoints)
    names = stream.topics
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    catalog_topic = app.topic(names.catalog, **raw)
    interactions_topic = app.topic(names.interactions, **raw)
    orders_topic = app.topic(names.orders, **raw)
    repartition_topic = app.topic(names.repartition, **raw)
    offsets: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset to forward

    def record(event: faust.types.EventT) -> Record:
        msg = event.message
        return Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, msg.timestamp)

    async def consume(stream_: faust.StreamT, kind: str) -> None:
        """Events in micro-batches: the invalid ones to dead-letters, the valid ones to the scoring process."""
        async def forward(valid: list[tuple[Record, GraphEvent]]) -> None:
            if valid:
                await scorer.send("events", [r for r, _ in valid], [e for _, e in valid], backlog())

        async for batch in stream_.take_events(stream.batch_size, within=stream.batch_within):
            valid: list[tuple[Record, GraphEvent]] = []
            for event in batch:
                offsets[event.message.tp[:2]] = event.message.offset + 1
                decoded = repartition.decode(event.value) if kind == "repartition" else decode(event.value, kind)
                if isinstance(decoded, Rejected):  # in offset order: the scoring process skips what is behind
                    await forward(valid)
                    valid = []
                    await scorer.send("dead", record(event), decoded.reason)
                else:  # the scoring process gets what the graph takes: it does not decode again
                    valid.append((record(event), decoded if kind == "repartition" else graph_input(decoded)))
            await forward(valid)

    @app.agent(catalog_topic, name="catalog")
    async def catalog(stream_: faust.StreamT) -> None:
        await consume(stream_, "item_upserted")

    @app.agent(interactions_topic, name="interactions")
    async def interactions(stream_: faust.StreamT) -> None:
        await consume(stream_, "interaction")

    @app.agent(orders_topic, name="orders")
    async def orders(stream_: faust.StreamT) -> None:
        await consume(stream_, "order")

    @app.agent(repartition_topic, name="repartition")
    async def repartitioned(stream_: faust.StreamT) -> None:
        await consume(stream_, "repartition")

    def tasks(tps: Any) -> list[int]:
        return sorted({tp.partition for tp in tps if tp.topic in names.inputs()})

    @app.on_partitions_revoked.connect
    async def revoked(_sender: Any, tps: Any, **__: Any) -> None:
        await scorer.send("revoke", tasks(tps))  # after every record sent before: the pipe keeps the order

    @app.on_partitions_assigned.connect
    async def assigned(_sender: Any, tps: Any, **__: Any) -> None:
        offsets.clear()  # positions of the new assignment: see lag()
        await scorer.send("assign", tasks(tps))

    def backlog() -> int:
        """Events on the broker after the newest forwarded ones, from the consumer's last known high-water
        marks (no broker call): the scoring process paces its refreshes by it."""
        assigned, total = app.consumer.assignment(), 0
        for tp in assigned:
            if tp[:2] in offsets:
                try:
                    high = app.consumer.highwater(tp)
                except AssertionError:  # aiokafka's "not assigned": a rebalance began meanwhile, lag() tells later
                    continue
                total += max(0, (high or 0) - offsets[tp[:2]])
        return total

    async def lag() -> dict[str, int]:
        """Events not yet forwarded per event topic (high-water mark minus the next offset to forward).

        A partition with no event forwarded since its assignment counts from
        the consumer's position (its committed offset, as nothing was
        fetched): counting from 0 made a restarted worker report the whole
        topic as lag until new events came.
        """
        behind: dict[str, int] = {}
        for tp in app.consumer.assignment():
            if tp.topic not in names.inputs():
                continue
            high = app.consumer.highwater(tp)
            if tp[:2] not in offsets:
                position = await app.consumer.position(tp)
                if position is None or tp[:2] in offsets:
                    continue
                offsets[tp[:2]] = position
            if high is not None:
                behind[tp.topic] = behind.get(tp.topic, 0) + max(0, high - offsets[tp[:2]])
        return behind

    @app.timer(stream.metrics_interval)
    async def measure() -> None:
        """Consumer lag per event topic, for the scoring process's metrics."""
        try:
            behind = await lag()
        except (ConsumerNotStarted, ConsumerStoppedError, KafkaError) as exc:  # starting, rebalancing or stopping: the next tick measures
            log.info("consumer lag not measured: %r", exc)
            return
        await scorer.send("lag", behind)

    @app.timer(stream.checkpoint_interval)
    async def commit() -> None:
        """Commit the newest checkpoint's offsets even when no new event is acknowledged (Faust commits only then)."""
        if checkpoints is not None and app.consumer.assignment():
            await app.consumer.commit_checkpoint()

    @app.timer(1.0)
    async def watch() -> None:
        """When the scoring process has died the worker exits at once, with status 70: the last checkpoint is
        its state and a restart resumes from it, while Faust's graceful stop could wait a long time on commits
        and acknowledgements of events that now go nowhere."""
        try:
            scorer.check()
        except RuntimeError as exc:
            log.critical("%s: the worker exits; a restart resumes from the last checkpoint", exc)
            logging.shutdown()
            os._exit(70)

    @app.on_before_shutdown.connect
    async def stop_scorer(*_: Any, **__: Any) -> None:
        await scorer.stop("the worker is shutting down")

    return app
