"""The scoring process: the worker's graph, complement lists and model, beside its Faust consumer.

Faust hands each message to an agent through several asyncio tasks (about
80 µs an event here), and applying, scoring and publishing take more than
that again: in one process the worker was bound by one core at 2,700
orders/s while the machine's second core sat idle. So ``bundlegnn worker``
is two processes:

* the Faust app (:mod:`streaming.worker`) consumes and validates events and
  forwards them here, in arrival order (the invalid ones as dead letters);
* this one applies them to the graph (:class:`streaming.state.WorkerState`,
  the code path of the batch replay), refreshes the complement lists of
  touched items and publishes them on ``bundle-updates``
  (:class:`streaming.publisher.Publisher`), sends dead letters, loads models
  from ``model-updates``, embeds new items, writes the worker's checkpoints
  and serves the Prometheus metrics.

It holds the worker's tasks (:mod:`streaming.repartition`): the consumer's
assignment arrives as ``assign`` and ``revoke`` commands, each task's state
is read from its checkpoint when it comes (:mod:`streaming.checkpoint`) and
written when it goes, every ``stream.checkpoint_interval`` seconds or
``stream.checkpoint_events`` events, and on a clean stop; records a task
already holds are skipped by offset. An order's change for another task's
items goes out on ``repartition``. A full pipe holds the Faust app back, so
neither side runs away from the other.
When this process dies the Faust app stops too (see :meth:`ScorerLink.check`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from graph.events import MAX_EVENT_BYTES, Interaction, ItemUpserted, OrderFacts
from graph.snapshot import save as save_snapshot
from graph.store import ROUTED, Applied, GraphConfig, GraphEvent, tune_gc
from streaming import checkpoint
from streaming.checkpoint import Checkpoint, Held
from streaming import repartition
from streaming.publisher import Publisher
from streaming.repartition import Sources
from streaming.settings import StreamConfig
from streaming.state import WorkerState
from training.complements import ScorerConfig, update_signature
from training.encoder import EncoderConfig, TextEncoder

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """A consumed message as the Faust app forwards it (``timestamp``: the producer's, in seconds)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (dead-lettered)
    timestamp: float | None



@dataclass
class ScorerSpec:
    """What the scoring process needs to build itself (it is started with ``spawn``: all of it is pickled)."""

    stream: StreamConfig
    graph: GraphConfig
    scoring: ScorerConfig
    bootstrap: str
    encoder: EncoderConfig | None = None  # None: no text encoding
    text_cache: Path = Path("var/text-cache")
    device: str = "cpu"
    model: Path | None = None  # artifact to load at start
    snapshot: Path | None = None  # where to write the graph on a clean stop
    logging: dict[str, Any] | None = None  # a logging.config.dictConfig mapping
    model_store: Path | None = None  # announced models must lie under it (None: anywhere)
    checkpoints: Path | None = None  # the worker's checkpoint directory (None: nothing survives a restart)


class Scorer:
    """The scoring process's work: commands from the Faust app in, complement lists out."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        encoder = spec.encoder.build(spec.text_cache) if spec.encoder is not None else None
        self.partitions = spec.stream.partitions
        self.state = WorkerState(spec.graph, spec.scoring, encoder, spec.device, self.partitions)
        # Tasks (see streaming.repartition): the consumer's assignment says which this process holds. A revoked
        # task stays in memory until the next assignment, which usually gives it back (Kafka's eager rebalance
        # revokes everything first): then it resumes if its checkpoint is still the one this process wrote.
        self.tasks: set[int] = set()
        self.suspended: dict[int, str | None] = {}  # revoked task → the id of the checkpoint written for it
        self.locks: dict[int, int] = {}  # task → its checkpoint directory's lock (see checkpoint.own)
        self.sources: dict[int, Sources] = {}  # task → the newest repartition source it applied, per sender
        self.offsets: dict[checkpoint.Position, int] = {}  # per input partition: the next record to apply
        self.held: dict[str, tuple[Record, str, float]] = {}  # order id → its early cancellation, reason, deadline
        self.letters_from: dict[int, int] = {}  # dead-letters partition → its end as of the last checkpoint
        self.published: set[checkpoint.Source] = set()  # sources of dead letters sent after a task's checkpoint
        self.suspects: set[checkpoint.Source] = set()  # records of a batch that failed to apply
        self.poison: dict[checkpoint.Source, str] = {}  # records that failed alone, with the error
        if spec.model is not None:
            self.state.load_model(spec.model)
        else:
            log.warning("no model artifact: scoring from co-purchase statistics and text")
        self.names = spec.stream.topics
        self.out = Publisher(spec.bootstrap, self.state.metrics, must_deliver=frozenset({self.names.repartition}),
                             security=spec.stream.security)
        self.queue: asyncio.Queue[tuple] = asyncio.Queue()  # commands read from the pipe, not yet applied
        self.backlog = 0  # events on the broker the Faust app had not forwarded yet, as of its last batch
        self.backlog_at = 0.0  # when that batch came (monotonic)
        self.secret = spec.stream.signing_secret()  # signs bundle updates
        # Applying, publishing and checkpointing take turns: a checkpoint must hold no event whose dead letter,
        # repartition record or refreshed list is not delivered yet.
        self.turn = asyncio.Lock()
        self.unsaved = 0  # records taken since the last checkpoint
        self.publishing = 0  # items of the refresh under way whose lists are not handed to the producer yet
        self.state.metrics.pending.set_function(lambda: len(self.state.pending) + self.publishing)
        self.next_checkpoint = time.monotonic() + spec.stream.checkpoint_interval

    async def run(self, conn: Connection) -> None:
        """Serve until the Faust app says stop (or is gone); a failing task ends the process with its error."""
        loop = asyncio.get_running_loop()
        queue = self.queue = asyncio.Queue(maxsize=4)  # a full queue stops the reader: the pipe fills
        threading.Thread(target=_read_commands, args=(conn, queue, loop), name="commands", daemon=True).start()
        positioned = asyncio.Event()
        tasks = [asyncio.create_task(coro) for coro in (self.refresher(), self.embedder(), self.measure(),
                                                         self.holder(), self.checkpointer(),
                                                         self.model_updates(positioned))]
        ready = asyncio.create_task(positioned.wait())
        await asyncio.wait([ready, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            if self.spec.stream.metrics_port:
                from prometheus_client import start_http_server

                start_http_server(self.spec.stream.metrics_port, registry=self.state.metrics.registry)
                log.info("worker metrics on :%d/metrics", self.spec.stream.metrics_port)
            conn.send(("ready",))
            tasks.append(asyncio.create_task(self.commands(queue)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a task's failure ends the process with its traceback
        finally:
            for task in (ready, *tasks):
                task.cancel()
            await asyncio.gather(ready, *tasks, return_exceptions=True)  # cancelled: their errors were raised above
            if self.spec.checkpoints is None:  # nothing keeps them: out they go
                await self.release_held(everything=True)
            await self.out.stop()  # flushes what is buffered
        if self.spec.snapshot is not None:
            save_snapshot(self.state.store, self.spec.snapshot)
            log.info("graph snapshot written to %s", self.spec.snapshot)

    async def commands(self, queue: asyncio.Queue[tuple]) -> None:
        """Apply the Faust app's commands in the order it sent them; return on ``stop`` (after a checkpoint)."""
        while True:
            command, *args = await queue.get()
            if command == "events":
                async with self.turn:
                    await self.apply(*args)
            elif command == "dead":
                async with self.turn:
                    if self.take(args[0]):
                        await self.dead_letter(*args)
            elif command == "assign":
                async with self.turn:
                    await self.assign(*args)
            elif command == "revoke":
                async with self.turn:
                    await self.revoke(*args)
            elif command == "lag":
                for topic_name, count in args[0].items():
                    self.state.metrics.lag.labels(topic_name).set(count)
            elif command == "stop":
                log.info("scoring process stopping: %s", args[0])
                await self.checkpoint()
                return
            else:
                raise ValueError(f"unknown command from the Faust app: {command!r}")
            if self.unsaved >= self.spec.stream.checkpoint_events:
                await self.checkpoint()
            await asyncio.sleep(0)  # a queue with commands waiting never suspends get(): let refreshes run

    # ---- tasks ----------------------------------------------------------------
    def _path(self, task: int) -> Path | None:
        return None if self.spec.checkpoints is None else checkpoint.task(self.spec.checkpoints, task)

    async def assign(self, partitions: list[int]) -> None:
        """Hold the tasks of ``partitions`` (the consumer's new assignment) from now on: each one resumes in
        memory when this process revoked it last and nobody checkpointed it since, else it is read from its
        checkpoint (waiting for the worker that had it to finish its last one); tasks kept in memory and not
        given back are forgotten."""
        wanted = set(partitions)
        for task in sorted(set(self.suspended) - wanted):
            self._forget(task)
        adopted: dict[int, Checkpoint] = {}
        loop = asyncio.get_running_loop()
        for task in sorted(wanted - self.tasks):
            path = self._path(task)
            if path is not None:
                self.locks[task] = await loop.run_in_executor(None, checkpoint.own, path)
            if task in self.suspended:
                if self.suspended.pop(task) == (checkpoint.current_id(path) if path is not None else None):
                    self.tasks.add(task)  # as this process left it
                    continue
                self._forget(task)
            restored = checkpoint.read(path) if path is not None else None
            if restored is not None:
                began = time.perf_counter()
                store, saved = restored
                self.state.adopt(store, saved.pending)
                self.offsets.update(saved.offsets)
                now = time.monotonic()
                self.held.update({order_id: (Record(h.topic, h.partition, h.offset, h.key, h.value, h.timestamp),
                                             h.reason, now + h.seconds_left) for order_id, h in saved.held.items()})
                self.sources[task] = Sources.from_json(saved.sources)
                adopted[task] = saved
                log.info("task %d from its checkpoint (read in %.2f s): %d co-purchase rows entries; offsets %s",
                         task, time.perf_counter() - began, store.co.stored, _positions(saved.offsets))
            else:
                self.sources[task] = Sources()
            if path is not None:  # a batch that failed to apply, noted before the process that had it died
                suspects, poison = checkpoint.suspects(path)
                self.suspects |= suspects
                self.poison.update(poison)
            self.tasks.add(task)
        if self.spec.checkpoints is not None and (adopted or not self.letters_from):
            await self.letters_since({t: s.letters_from for t, s in adopted.items()})
        log.info("holding tasks %s", sorted(self.tasks))

    async def revoke(self, partitions: list[int]) -> None:
        """Checkpoint the tasks of ``partitions`` and let them go (they stay in memory until the next assignment,
        which may give them back)."""
        gone = sorted(set(partitions) & self.tasks)
        if not gone:
            return
        await self.out.flush()
        for task in gone:
            self.suspended[task] = self._write(task)
            self.tasks.discard(task)
            if task in self.locks:
                os.close(self.locks.pop(task))
        log.info("tasks %s revoked and checkpointed; holding %s", gone, sorted(self.tasks))

    def _forget(self, task: int) -> None:
        """Drop a task's state from memory (it is held elsewhere now)."""
        self.suspended.pop(task, None)
        self.state.store.release(task)
        part = self.state.partition_of
        self.offsets = {k: v for k, v in self.offsets.items() if k[1] != task}
        self.held = {o: h for o, h in self.held.items() if h[0].partition != task}
        self.state.pending = {i: t for i, t in self.state.pending.items() if part(i) != task}
        self.sources.pop(task, None)
        self.suspects = {x for x in self.suspects if x[1] != task}
        self.poison = {x: r for x, r in self.poison.items() if x[1] != task}

    def _write(self, task: int) -> str | None:
        """Write task's checkpoint (the producer has delivered everything sent before); return its id."""
        path = self._path(task)
        if path is None:
            return None
        if self.out.lost:  # another task's share was lost: only the restart from the last checkpoints sends it
            raise RuntimeError(f"{self.out.lost} repartition records were not delivered; the worker restarts from "
                               "its last checkpoints, which send them again")
        part, now = self.state.partition_of, time.monotonic()
        letters = self.names.dead_letters
        self.letters_from.update({p: o for (t, p), o in self.out.delivered.items() if t == letters})
        held = {order_id: Held(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp, reason,
                               max(0.0, deadline - now))
                for order_id, (r, reason, deadline) in self.held.items() if r.partition == task}
        state = Checkpoint({k: v for k, v in self.offsets.items() if k[1] == task}, held,
                           {i: t for i, t in self.state.pending.items() if part(i) == task}, self.letters_from,
                           self.sources[task].as_json())
        written = checkpoint.write(path, self.state.store.part(task), state)
        checkpoint.note_suspects(path, {x for x in self.suspects if x[1] == task},
                                 {x: r for x, r in self.poison.items() if x[1] == task})
        return written

    def take(self, record: Record) -> bool:
        """Whether ``record`` is new to the state (then it counts as taken: the next checkpoint covers it).

        After a restart the consumer may hand over records the checkpoint already holds (its committed
        offsets can lag the checkpoint's); they are skipped here, so none is applied twice. Records of a task
        this process does not hold (sent before their partition was revoked) are skipped too: its holder reads
        them."""
        if record.partition not in self.tasks or self._covered(_source(record)):
            return False
        self.offsets[(record.topic, record.partition)] = record.offset + 1
        self.unsaved += 1
        return True

    async def apply(self, records: list[Record], events: list[GraphEvent], backlog: int = 0) -> None:
        """Apply a micro-batch of validated events (one per record); those that reference nothing go to dead-letters.

        ``backlog``: events the Faust app had not yet forwarded when it sent these (it paces refreshes).
        """
        self.backlog, self.backlog_at = backlog, time.monotonic()
        routed = self.names.repartition
        new = [k for k, record in enumerate(records) if self.take(record)]
        new = [k for k in new if records[k].topic != routed or self.sources[records[k].partition].fresh(events[k][0])]
        if len(new) < len(records):  # (a repartition record not fresh: a copy its sender produced again)
            records, events = [records[k] for k in new], [events[k] for k in new]
        events = [e[1] if r.topic == routed else e for r, e in zip(records, events)]
        dead: list[tuple[Record, str]] = []
        if self.poison:  # records that failed alone before: dead letters, not applied again
            dead += [(r, f"applying it failed ({self.poison[_source(r)]}); the worker skips it")
                     for r in records if _source(r) in self.poison]
            keep = [k for k, r in enumerate(records) if _source(r) not in self.poison]
            records, events = [records[k] for k in keep], [events[k] for k in keep]
        if self.suspects and any(_source(r) in self.suspects for r in records):  # one at a time: find the one
            results = [result for r, e in zip(records, events) for result in self._apply([r], [e])]
        else:
            results = self._apply(records, events)
        await self.route(records, events, results)
        held, hold = self.held, self.spec.stream.cancel_hold
        for record, event, result in zip(records, events, results):
            if result.ahead and hold:  # its order may still come: wait for it before calling this a dead letter
                held[event.order_id] = (record, result.note, time.monotonic() + hold)
            elif result.rejected:
                dead.append((record, result.note))
            elif held and isinstance(event, OrderFacts) and event.status == "placed" and event.order_id in held:
                held.pop(event.order_id)  # the order came: the cancellation took it back (neither counts)
        await self.dead_letters(dead)

    async def route(self, records: list[Record], events: list[GraphEvent], results: list[Applied]) -> None:
        """Send the other tasks their part of what the input records changed (see :mod:`streaming.repartition`)."""
        if self.partitions == 1:
            return
        routed, n = self.names.repartition, self.partitions
        for record, event, result in zip(records, events, results):
            if record.topic == routed or result.rejected:
                continue
            if result.change is not None or (result.changed and isinstance(event, Interaction)) or \
                    isinstance(event, ItemUpserted):
                for out in repartition.outputs(record.topic, record.partition, record.offset, event, n, result.change):
                    await self.out.send(routed, key=out.key, value=out.value, partition=out.partition)

    def _apply(self, records: list[Record], events: list[GraphEvent]) -> list[Applied]:
        """Apply events; when that raises, note the records beside the checkpoint (the batch, or the one record
        as poison) and raise: the process exits and its restart, from the last checkpoint, goes around them."""
        routed = self.names.repartition
        try:
            return self.state.apply_many(events, [r.timestamp for r in records],
                                         [ROUTED if r.topic == routed else r.partition for r in records])
        except Exception as exc:
            if self.spec.checkpoints is not None:
                if len(records) == 1:
                    self.poison[_source(records[0])] = f"{type(exc).__name__}: {exc}"[:500]
                else:
                    self.suspects |= {_source(r) for r in records}
                for task in {r.partition for r in records}:
                    path = checkpoint.task(self.spec.checkpoints, task)
                    checkpoint.note_suspects(path, {x for x in self.suspects if x[1] == task},
                                             {x: r for x, r in self.poison.items() if x[1] == task})
                log.critical("applying %d records from %s[%d]@%d failed; restarting from the last checkpoint, %s",
                             len(records), records[0].topic, records[0].partition, records[0].offset,
                             "that record will be dead-lettered" if len(records) == 1 else "one at a time")
            raise

    async def dead_letters(self, dead: list[tuple[Record, str]]) -> None:
        """Publish a batch of dead letters with one log line: a backlog of stray cancellations would be thousands."""
        for record, reason in dead:
            await self.dead_letter(record, reason, logged=False)
        if dead:
            (record, reason), more = dead[0], len(dead) - 1
            log.warning("dead letter from %s[%d]@%d: %s%s", record.topic, record.partition, record.offset, reason,
                        f" (and {more} more in this batch, each on dead-letters with its reason)" if more else "")

    async def dead_letter(self, record: Record, reason: str, logged: bool = True) -> None:
        """Publish a message on ``dead-letters`` with the reason and where it came from (and log it)."""
        headers = [("reason", reason.encode()), ("topic", record.topic.encode()),
                   ("partition", str(record.partition).encode()), ("offset", str(record.offset).encode())]
        value = record.value
        if value is not None and len(value) > MAX_EVENT_BYTES:  # the broker may refuse it: keep its start
            headers.append(("truncated_from", str(len(value)).encode()))
            value = value[:1024]
        if _source(record) in self.published:  # sent before a crash
            self.published.discard(_source(record))
            return
        self.state.metrics.dead_letters.labels(record.topic).inc()
        if logged:
            log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)
        await self.out.send(self.names.dead_letters, key=record.key, value=value, headers=headers, droppable=True)

    async def letters_since(self, saved: dict[int, dict[int, int]]) -> None:
        """Read the dead letters published after the checkpoints of tasks just read (``saved``: task → the
        dead-letters ends its checkpoint saved): their records come again and are not dead-lettered twice.
        A first start notes the topic's ends."""
        topic = self.names.dead_letters
        consumer = AIOKafkaConsumer(bootstrap_servers=self.spec.bootstrap, enable_auto_commit=False,
                                    **self.spec.stream.security.client_options())
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                starts = [ends_of[tp.partition] for ends_of in saved.values() if tp.partition in ends_of]
                self.letters_from.setdefault(tp.partition, min(starts, default=ends[tp]))
                consumer.seek(tp, min(starts, default=ends[tp]))
            quiet_until = None
            while saved:  # to the ends, then a while longer: tansu reports ends short after multi-record batches
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for r in records:
                        h = dict(r.headers)  # (a held cancellation's letter too: the checkpoint holds it again)
                        source = (h["topic"].decode(), int(h["partition"]), int(h["offset"]))
                        if source[1] in saved:
                            self.published.add(source)
                at_end = all([await consumer.position(tp) >= ends[tp] for tp in tps])
                if at_end and not batch:
                    quiet_until = quiet_until or time.monotonic() + 0.5
                    if time.monotonic() >= quiet_until:
                        break
        finally:
            await consumer.stop()
        if self.published:
            log.info("%d dead letters were published after their task's checkpoint; their records are not "
                     "dead-lettered again", len(self.published))

    async def release_held(self, everything: bool = False) -> None:
        """Cancellations whose order did not come within ``stream.cancel_hold`` go to dead-letters
        (``everything``: all still held, as the process stops)."""
        now, dead = time.monotonic(), []
        for order_id, (record, reason, deadline) in list(self.held.items()):
            if record.partition in self.tasks and (everything or deadline <= now):
                del self.held[order_id]
                dead.append((record, f"{reason}; its order did not come within {self.spec.stream.cancel_hold:g} s "
                                     "(stream.cancel_hold)"))
        await self.dead_letters(dead)

    async def holder(self) -> None:
        """Release held cancellations as they expire."""
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.spec.stream.cancel_hold / 4)))
            async with self.turn:
                await self.release_held()

    async def checkpointer(self) -> None:
        """A checkpoint every ``stream.checkpoint_interval`` seconds while records come in (and
        ``stream.checkpoint_events`` records, see :meth:`commands`)."""
        while True:
            await asyncio.sleep(max(0.0, self.next_checkpoint - time.monotonic()))
            if self.unsaved:
                await self.checkpoint()
            else:
                self.next_checkpoint = time.monotonic() + self.spec.stream.checkpoint_interval

    async def checkpoint(self) -> None:
        """Deliver everything sent so far, then write each task's state and the offsets it reflects (see
        :mod:`streaming.checkpoint`); the Faust app commits offsets from them."""
        if self.spec.checkpoints is None:
            return
        async with self.turn:
            began = time.perf_counter()
            await self.out.flush()
            if self.suspects or self.poison:  # what the checkpoint holds needs no going around any more
                covered = self._covered
                self.suspects = {s for s in self.suspects if not covered(s)}
                self.poison = {s: reason for s, reason in self.poison.items() if not covered(s)}
            for task in sorted(self.tasks):
                self._write(task)
            took = time.perf_counter() - began
            self.state.metrics.checkpoint_seconds.observe(took)
            log.info("checkpoint of tasks %s written in %.2f s (%d records since the last): offsets %s",
                     sorted(self.tasks), took, self.unsaved, _positions(self.offsets))
            self.unsaved = 0
            self.next_checkpoint = time.monotonic() + self.spec.stream.checkpoint_interval

    def _covered(self, source: checkpoint.Source) -> bool:
        """Whether the record at ``source`` is in the state already (applied or dead-lettered)."""
        return source[2] < self.offsets.get(source[:2], 0)

    async def refresher(self) -> None:
        """Refresh, pause, repeat: the pause is ``refresh_interval``, longer while events wait and refreshes take long.

        Under load an item is touched by many events between two refreshes,
        and one refresh then serves them all: while events wait (here or on
        the broker), the pause grows so refreshing takes at most
        ``refresh_share`` of this process's time and the rest goes to
        applying events. Once none wait, the next refresh comes at once: a
        longer pause would hold back nothing but the lists.
        """
        stream = self.spec.stream
        share = stream.refresh_share
        while True:
            started = time.perf_counter()
            await self.refresh()
            took = time.perf_counter() - started
            await asyncio.sleep(stream.refresh_interval)
            deadline = time.perf_counter() + took * (1 - share) / share - stream.refresh_interval
            while self.events_wait() and (left := deadline - time.perf_counter()) > 0:
                await asyncio.sleep(min(left, stream.refresh_interval))

    def events_wait(self) -> bool:
        """Whether events wait here or on the broker. The broker's count comes with each batch: once no batch
        has come for a while (the fetcher looks again within 50 ms) it is stale — the last batch of a backlog
        may report a few events still to come that were in it — and the next refresh must not wait on it."""
        fresh = time.monotonic() - self.backlog_at < max(0.25, 4 * self.spec.stream.fetch_max_wait)
        return bool(self.queue.qsize() or (self.backlog and fresh))

    async def refresh(self) -> None:
        """Publish fresh complement lists of the items touched since the last refresh."""
        state = self.state
        job = state.text_job()
        if job is not None and state.encoder is not None:  # the encoder runs in a thread: commands go on
            vectors = await asyncio.get_running_loop().run_in_executor(None, _encode, state.encoder, job[1])
            state.set_text(job[0], vectors)
        if not state.pending:
            return
        async with self.turn:  # no checkpoint between taking the items and handing their lists to the producer
            await self._publish()

    async def _publish(self) -> None:
        state = self.state
        started = time.perf_counter()
        pending, state.pending = state.pending, {}
        if self.partitions > 1:  # each task publishes its own items' lists; a revoked one's wait for its next holder
            part = state.partition_of
            state.pending = {i: t for i, t in pending.items() if part(i) in self.suspended}
            pending = {i: t for i, t in pending.items() if part(i) in self.tasks}
        m = state.metrics
        secret = self.secret
        self.publishing = len(pending)  # still pending on the metrics until handed over
        for item, ts in pending.items():  # in one go (no commands in between): its time paces the next
            key, value = item.encode(), state.scorer.update_json(item, ts or None)
            headers = [("signature", update_signature(secret, key, value))] if secret is not None else None
            await self.out.send(self.names.bundle_updates, key=key, value=value, headers=headers)
            self.publishing -= 1
            if ts:
                m.event_to_update.observe(time.time() - ts)
        m.updates.inc(len(pending))
        m.refresh_seconds.observe(time.perf_counter() - started)

    async def embedder(self) -> None:
        """Every ``embed_interval``: an inductive pass gives model views to items the model has not seen."""
        state = self.state
        while True:
            await asyncio.sleep(self.spec.stream.embed_interval)
            graph = state.inductive_graph()
            if graph is None or state.artifact is None:
                continue
            item_ids, model = list(state.store.items.ids), state.artifact.model
            h = await asyncio.get_running_loop().run_in_executor(None, _forward, model, graph)
            for item in state.install_views(item_ids, h):
                state.pending.setdefault(item, time.time())

    async def measure(self) -> None:
        """Graph size on the metrics, every ``metrics_interval`` (consumer lag comes from the Faust app)."""
        metrics, store = self.state.metrics, self.state.store
        while True:
            metrics.items.set(store.num_items)
            metrics.co_edges.set(store.num_co_edges())
            await asyncio.sleep(self.spec.stream.metrics_interval)

    async def model_updates(self, positioned: asyncio.Event) -> None:
        """Read ``model-updates`` from its end without a consumer group: every worker loads every model."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.spec.bootstrap, enable_auto_commit=False,
                                    **self.spec.stream.security.client_options())
        await consumer.start()
        try:
            partitions = await _partitions(consumer, self.names.model_updates)
            tps = [TopicPartition(self.names.model_updates, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end now: a model announced after "ready" is not missed
                await consumer.position(tp)
            positioned.set()
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        self._swap(record.value)
        finally:
            await consumer.stop()

    def _swap(self, value: bytes | None) -> None:
        """Load an announced model, or refuse it (a log line and a metric) and keep serving the live one.

        Anything can be on the topic: not JSON, a path outside the model store, missing files, arrays of the
        wrong shape, a pickle carrying code (``weights_only`` loading refuses it). Every failure is caught here
        by design: no announcement may stop the worker.
        """
        try:
            path = Path(json.loads(value or b"null")["path"]).resolve()
            store = self.spec.model_store
            if store is not None and not path.is_relative_to(Path(store).resolve()):
                raise ValueError(f"{path} is outside the model store {Path(store).resolve()}")
            self.state.load_model(path)
        except Exception as exc:  # noqa: BLE001 — see the docstring; logged and counted, never silent
            self.state.metrics.models_refused.inc()
            log.error("model-updates message refused, the live model stays (%s: %s): %r", type(exc).__name__, exc,
                      (value or b"")[:200])


def _read_commands(conn: Connection, queue: asyncio.Queue[tuple], loop: asyncio.AbstractEventLoop) -> None:
    """Pipe → queue, in order; waits while the queue is full. The Faust app gone counts as ``stop``."""
    while True:
        try:
            command = conn.recv()
        except EOFError:
            command = ("stop", "the Faust process closed the pipe")
        asyncio.run_coroutine_threadsafe(queue.put(command), loop).result()
        if command[0] == "stop":
            return


def serve(spec: ScorerSpec, conn: Connection) -> None:
    """The scoring process's entry point (``multiprocessing`` target)."""
    # Ctrl-C reaches the whole process group, and so does SIGTERM from a group kill (systemd's control group,
    # `bundlegnn demo`): the Faust app says when to stop, after this process's last checkpoint. (The Faust
    # process gone closes the pipe, which stops this one too; SIGKILL still ends it at once.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if spec.logging is not None:
        logging.config.dictConfig(spec.logging)
    tune_gc()
    try:
        scorer = Scorer(spec)
    except Exception as exc:
        conn.send(("failed", repr(exc)))
        raise
    asyncio.run(scorer.run(conn))


class ScorerLink:
    """The Faust app's end of the scoring process: start it, send it commands in order, stop it."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="scorer-pipe")  # one thread: sends stay in order

    @classmethod
    def start(cls, spec: ScorerSpec, timeout: float = 600.0) -> ScorerLink:
        """Start the scoring process and wait until it is ready (model loaded, ``model-updates`` positioned)."""
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads (torch, Kafka clients)
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=serve, args=(spec, theirs), name="bundlegnn-scorer", daemon=True)
        process.start()
        theirs.close()
        deadline = time.monotonic() + timeout
        while not ours.poll(0.2):
            if not process.is_alive():
                raise RuntimeError(f"the scoring process exited with {process.exitcode} before it was ready")
            if time.monotonic() > deadline:
                process.kill()  # (it ignores SIGTERM: see serve)
                raise RuntimeError(f"the scoring process was not ready after {timeout:.0f} s")
        try:
            answer = ours.recv()
        except EOFError:  # it exited between poll and recv
            process.join(5)
            answer = ("failed", f"exit code {process.exitcode}")
        if answer[0] != "ready":
            raise RuntimeError(f"the scoring process failed to start: {answer[1]}")
        return cls(process, ours)

    async def send(self, *command: Any) -> None:
        """Send a command; waits (without blocking the event loop) while the scoring process is behind."""
        await asyncio.get_running_loop().run_in_executor(self._sender, self.conn.send, command)

    def check(self) -> None:
        """Raise if the scoring process has died (the Faust app then stops: its events would go nowhere)."""
        if not self.process.is_alive():
            raise RuntimeError(f"the scoring process exited with {self.process.exitcode}")

    async def stop(self, reason: str, timeout: float = 60.0) -> int | None:
        """Ask the scoring process to stop (it flushes its producer and writes the snapshot) and wait for it."""
        if self.process.is_alive():
            try:
                await self.send("stop", reason)
            except OSError as exc:  # it died meanwhile: its exit code says more
                log.error("stop not delivered to the scoring process: %r", exc)
            await asyncio.get_running_loop().run_in_executor(None, self.process.join, timeout)
            if self.process.is_alive():
                log.error("the scoring process did not stop within %.0f s; killing it", timeout)
                self.process.kill()  # SIGTERM would not do: it ignores it (see serve)
                self.process.join(5)
        self._sender.shutdown()
        if self.process.exitcode:
            log.error("the scoring process exited with %s", self.process.exitcode)
        return self.process.exitcode


def _encode(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(texts, progress=False)


def _forward(model: Any, graph: Any) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        return graph.embed(model)


def _source(record: Record) -> checkpoint.Source:
    return record.topic, record.partition, record.offset


def _positions(offsets: dict[checkpoint.Position, int]) -> str:
    """Offsets per topic for a log line: ``orders 0:120 1:98 …``."""
    topics: dict[str, list[str]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        topics.setdefault(topic, []).append(f"{partition}:{offset}")
    return "; ".join(f"{topic} {' '.join(parts)}" for topic, parts in topics.items()) or "none"


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    for _ in range(50):
        if topic in await consumer.topics():  # refreshes metadata: the topic may be created after the worker starts
            return sorted(consumer.partitions_for_topic(topic) or ())
        await asyncio.sleep(0.2)
    raise RuntimeError(f"topic {topic!r} does not exist")
