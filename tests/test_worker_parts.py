"""Parts of the stream worker that need no broker: publishing, the scoring process's commands, checkpoints,
commits and seeks from them, and refresh pacing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.types import TP

from graph.events import ItemUpserted, Order
from graph.store import GraphConfig
from streaming.codec import encode, graph_input
from streaming import checkpoint, transport
from streaming.metrics import WorkerMetrics
from streaming.publisher import Publisher
from streaming.scorer import Record, Scorer, ScorerSpec
from streaming.settings import StreamConfig
from tests.conftest import at
from training.complements import ScorerConfig


def delivered(topic: str, offset: int) -> SimpleNamespace:
    """aiokafka's RecordMetadata, as far as the publisher reads it."""
    return SimpleNamespace(topic=topic, partition=0, offset=offset)


class FakeProducer:
    """Answers sends like aiokafka: a delivery future, or MessageSizeTooLargeError for big values."""

    def __init__(self, max_value: int = 100) -> None:
        self.max_value, self.sent, self.deliveries = max_value, [], []

    async def send(self, topic, key=None, value=None, headers=None, partition=None):
        if value is not None and len(value) > self.max_value:
            raise MessageSizeTooLargeError("too big")
        self.sent.append((topic, key, value, headers))
        delivery = asyncio.get_running_loop().create_future()
        self.deliveries.append(delivery)
        return delivery

    async def flush(self) -> None:
        for n, delivery in enumerate(self.deliveries):
            if not delivery.done():
                delivery.set_result(delivered(self.sent[n][0], n))


def test_a_refused_record_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> WorkerMetrics:
        metrics = WorkerMetrics()
        producer = FakeProducer()
        publisher = Publisher("unused", metrics, producer)
        await publisher.send("bundle-updates", b"A", b"{}")
        await publisher.send("bundle-updates", b"B", b"{}")
        producer.deliveries[0].set_result(delivered("bundle-updates", 0))
        producer.deliveries[1].set_exception(KafkaTimeoutError("no answer"))
        await asyncio.sleep(0)  # done-callbacks run on the next loop pass
        return metrics

    with caplog.at_level(logging.ERROR, logger="streaming.publisher"):
        metrics = asyncio.run(run())
    assert metrics.value("bundlegnn_worker_publish_failures_total", {"topic": "bundle-updates"}) == 1
    assert "key b'B'" in caplog.text and "no answer" in caplog.text and "b'A'" not in caplog.text


def test_the_worker_s_records_count_as_delivered_once_every_in_sync_replica_has_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint relies on delivered repartition records: aiokafka's default (acks=1, the leader alone) can
    lose one in a failover after the checkpoint that counted on it."""
    import streaming.publisher

    made: list[dict] = []

    class Producer(FakeProducer):
        def __init__(self, **options: object) -> None:
            super().__init__()
            made.append(options)

        async def start(self) -> None:
            pass

    monkeypatch.setattr(streaming.publisher, "AIOKafkaProducer", Producer)
    asyncio.run(Publisher("k:9092", WorkerMetrics()).send("repartition", b"k", b"v"))
    assert len(made) == 1 and made[0]["acks"] == "all" and made[0]["security_protocol"] == "PLAINTEXT"


def test_a_dead_letter_too_big_for_a_request_goes_out_without_its_value() -> None:
    async def run() -> FakeProducer:
        producer = FakeProducer(max_value=100)
        publisher = Publisher("unused", WorkerMetrics(), producer)
        await publisher.send("dead-letters", b"k", b"x" * 500, headers=[("reason", b"not JSON")], droppable=True)
        return producer

    (topic, key, value, headers), = asyncio.run(run()).sent
    assert (topic, key, value) == ("dead-letters", b"k", None)
    assert dict(headers)["reason"] == b"not JSON" and dict(headers)["value-dropped"].startswith(b"500 bytes")


def scorer(checkpoints: Path | None = None, **stream: object) -> Scorer:
    """A scoring process's work without its process, holding its one task: no broker, sends go to a
    FakeProducer."""
    spec = ScorerSpec(StreamConfig(**{"partitions": 1, **stream}), GraphConfig(), ScorerConfig(), "unused",
                      checkpoints=checkpoints)
    work = Scorer(spec)
    work.out = Publisher("unused", work.state.metrics, FakeProducer(max_value=10_000), must_deliver=work.out.must_deliver)

    async def no_dead_letters_topic(saved: dict) -> None:
        """(letters_since reads the dead-letters topic: there is no broker here)"""

    work.letters_since = no_dead_letters_topic  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:  # (its own event loop: some tests call this inside theirs)
        pool.submit(asyncio.run, work.assign(list(range(spec.stream.partitions)))).result()
    return work


def stopped(work: Scorer) -> None:
    """The process ends (exits, or is stopped): its locks on the task checkpoints go with it."""
    for fd in work.locks.values():
        os.close(fd)


def message(offset: int, event: Order | ItemUpserted, topic: str = "orders") -> Record:
    return Record(topic, 0, offset, event.model_dump_json().encode()[:12], encode(event), 1_000.0 + offset)


def forwarded(*events: tuple[int, Order | ItemUpserted], backlog: int = 0) -> tuple:
    """An ``events`` command as the Faust app sends it: the records and what the graph takes from them."""
    return "events", [message(offset, e) for offset, e in events], [graph_input(e) for _, e in events], backlog


def test_the_scoring_process_applies_commands_in_order_and_sends_dead_letters() -> None:
    placed = Order(order_id="o1", user_id="u", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(1))
    stray = Order(order_id="o9", items=[{"item_id": "A"}], status="cancelled", ts=at(2))
    later = Order(order_id="o2", items=[{"item_id": "A"}, {"item_id": "C"}], ts=at(3))
    bad = Record("orders", 0, 2, b"k", b"{not json", None)
    commands = [forwarded((0, placed), (1, stray), backlog=5), ("dead", bad, "not JSON: ..."),
                ("lag", {"orders": 3}), forwarded((3, later), (4, placed)), ("stop", "test")]

    async def run() -> Scorer:
        work = scorer(cancel_hold=0)  # a stray cancellation is a dead letter at once
        for command in commands:
            work.queue.put_nowait(command)
        await work.commands(work.queue)
        return work

    work = asyncio.run(run())
    store, metrics = work.state.store, work.state.metrics
    assert store.co_purchase("A", "B").count == 1 and store.co_purchase("A", "C").count == 1  # o1 once: a duplicate
    assert store.stats.duplicates == 1 and work.backlog == 0
    assert set(work.state.pending) == {"A", "B", "C"} and work.state.pending["C"] == 1_003.0  # the producer's time
    letters = [(key, value, dict(headers)) for topic, key, value, headers in work.out.producer.sent]
    assert [(h["reason"].split(b" (")[0].split(b":")[0], h["offset"]) for _, _, h in letters] == [
        (b"cancels unknown order o9", b"1"), (b"not JSON", b"2")]
    assert letters[0][1] == encode(stray) and letters[1][1] == b"{not json"  # the original bytes
    assert metrics.value("bundlegnn_worker_dead_letters_total", {"topic": "orders"}) == 2
    assert metrics.value("bundlegnn_worker_consumer_lag", {"topic": "orders"}) == 3
    assert metrics.value("bundlegnn_worker_events_total", {"kind": "order"}) == 4


def test_a_cancellation_ahead_of_its_order_is_held_then_dead_lettered() -> None:
    """A cancellation that comes before its order waits ``stream.cancel_hold`` for it: if the order comes it
    is no dead letter (the two take each other back), if not it goes to dead-letters with the reason."""
    early = Order(order_id="o1", items=[{"item_id": "A"}], status="cancelled", ts=at(1))
    placed = Order(order_id="o1", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(1))
    stray = Order(order_id="o9", items=[{"item_id": "A"}], status="cancelled", ts=at(2))

    async def run() -> tuple[Scorer, list, list]:
        work = scorer(cancel_hold=0.3)
        await work.apply(*forwarded((0, early), (1, stray))[1:])
        await work.release_held()
        first = list(work.out.producer.sent)  # nothing yet: both are held
        await work.apply(*forwarded((2, placed))[1:])
        await asyncio.sleep(0.35)
        await work.release_held()
        return work, first, list(work.out.producer.sent)

    work, first, letters = asyncio.run(run())
    assert first == [] and work.held == {}
    assert [(dict(h)["offset"], value) for _, _, value, h in letters] == [(b"1", encode(stray))]  # o9 only
    reason = dict(letters[0][3])["reason"].decode()
    assert reason.startswith("cancels unknown order o9") and "within 0.3 s (stream.cancel_hold)" in reason
    assert work.state.store.co_purchase("A", "B") is None  # o1 placed after its cancellation: ignored


def test_a_restart_resumes_from_the_checkpoint_and_skips_what_it_holds(tmp_path: Path) -> None:
    """The stop writes a checkpoint (graph, offsets, held cancellation, lists not yet published); a new scoring
    process starts from it, skips the records it holds when the consumer hands them over again, applies the
    rest once."""
    o1 = Order(order_id="o1", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(1))
    early = Order(order_id="o7", items=[{"item_id": "A"}], status="cancelled", ts=at(2))
    o2 = Order(order_id="o2", items=[{"item_id": "A"}, {"item_id": "C"}], ts=at(3))
    o7 = Order(order_id="o7", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(2))

    async def first() -> Scorer:
        work = scorer(tmp_path, cancel_hold=60)
        for command in (forwarded((0, o1), (1, early)), ("dead", Record("orders", 0, 2, b"k", b"{", None), "not JSON"),
                        ("stop", "test")):
            work.queue.put_nowait(command)
        await work.commands(work.queue)
        return work

    before = asyncio.run(first())
    stopped(before)
    assert checkpoint.offsets(tmp_path) == {("orders", 0): 3}
    assert set(before.held) == {"o7"} and len(before.out.producer.sent) == 1  # the bad JSON only

    async def second() -> Scorer:
        work = scorer(tmp_path, cancel_hold=60)
        assert set(work.held) == {"o7"} and set(work.state.pending) == {"A", "B"}  # as the first one left them
        # the consumer's committed offsets lagged: it hands over everything again, then what is new
        for command in (forwarded((0, o1), (1, early)), ("dead", Record("orders", 0, 2, b"k", b"{", None), "not JSON"),
                        forwarded((3, o2), (4, o7)), ("stop", "test")):
            work.queue.put_nowait(command)
        await work.commands(work.queue)
        return work

    after = asyncio.run(second())
    store = after.state.store
    assert store.co_purchase("A", "B").count == 1 and store.co_purchase("A", "C").count == 1  # o1 once, o7 never
    assert (store.stats.events, store.stats.orders_placed) == (4, 2)  # o1, early, o2, o7: each once
    assert after.out.producer.sent == []  # nothing dead-lettered twice
    assert after.held == {} and checkpoint.offsets(tmp_path) == {("orders", 0): 5}
    assert checkpoint.read(checkpoint.task(tmp_path, 0))[0].co_purchase("A", "C").count == 1


def test_a_record_that_fails_to_apply_is_found_and_dead_lettered_not_a_crash_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose application raises ends the process with its records noted; the restart applies them one
    at a time and notes the one that fails again; the next start dead-letters it and applies the rest."""
    from graph.store import GraphStore

    apply_many = GraphStore.apply_many

    def failing(self, events, partitions=None):  # a bug that only this order meets
        if any(getattr(e, "order_id", "") == "boom" for e in events):
            raise OverflowError("math range error")
        return apply_many(self, events, partitions)

    monkeypatch.setattr(GraphStore, "apply_many", failing)
    batch = forwarded((0, Order(order_id="o1", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(1))),
                      (1, Order(order_id="boom", items=[{"item_id": "A"}, {"item_id": "C"}], ts=at(2))),
                      (2, Order(order_id="o2", items=[{"item_id": "B"}, {"item_id": "C"}], ts=at(3))))

    def start() -> Scorer:
        work = scorer(tmp_path, cancel_hold=0)
        with pytest.raises(OverflowError) if work.poison == {} else contextlib.nullcontext():
            asyncio.run(work.apply(*batch[1:]))
        stopped(work)
        return work

    first = start()
    assert first.suspects == {("orders", 0, 0), ("orders", 0, 1), ("orders", 0, 2)} and first.poison == {}
    second = start()  # one at a time: o1 applies, boom fails alone
    assert set(second.poison) == {("orders", 0, 1)} and "OverflowError: math range error" in second.poison[("orders", 0, 1)]
    third = start()  # boom is a dead letter; o1 and o2 apply
    store = third.state.store
    assert store.co_purchase("A", "B").count == 1 and store.co_purchase("B", "C").count == 1
    assert store.co_purchase("A", "C") is None
    (topic, key, value, headers), = third.out.producer.sent
    assert dict(headers)["offset"] == b"1" and b"OverflowError: math range error" in dict(headers)["reason"]


def test_commits_and_seeks_follow_the_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever Faust acknowledged, the consumer commits the checkpoint's offsets of its assigned partitions;
    on assignment it seeks to them, and to the beginning of partitions the checkpoint has not seen."""
    held = {("orders", 0): 120, ("orders", 1): 80, ("catalog", 3): 9}
    commits: list[dict] = []

    class Thread:
        async def commit(self, offsets: dict) -> bool:
            commits.append(offsets)
            return True

    consumer = transport.Consumer.__new__(transport.Consumer)
    consumer.app, consumer._thread = SimpleNamespace(checkpoint_offsets=lambda: held), Thread()
    monkeypatch.setattr(transport.Consumer, "assignment", lambda self: {TP("orders", 0), TP("orders", 1), TP("orders", 2)})
    assert asyncio.run(consumer._commit({TP("orders", 0): 500, TP("orders", 2): 7}))
    assert commits == [{TP("orders", 0): 120, TP("orders", 1): 80}]

    class Kafka:  # aiokafka's consumer, as far as seeking goes
        def __init__(self) -> None:
            self.at: dict = {}

        def assignment(self) -> set:
            return {TP("orders", 0), TP("orders", 2)}

        def seek(self, tp: TP, offset: int) -> None:
            self.at[tp] = offset

        async def seek_to_beginning(self, tp: TP) -> None:
            self.at[tp] = 4  # retention removed 0..3

        async def position(self, tp: TP) -> int:
            return self.at[tp]

    thread = transport.ConsumerThread.__new__(transport.ConsumerThread)
    kafka = Kafka()
    thread._ensure_consumer = lambda: kafka
    assert asyncio.run(thread._seek_to_checkpoint(held)) == {TP("orders", 0): 120, TP("orders", 2): 4}
    assert kafka.at == {TP("orders", 0): 120, TP("orders", 2): 4}


def test_an_unknown_command_stops_the_scoring_process() -> None:
    async def run() -> None:
        work = scorer()
        work.queue.put_nowait(("reticulate", 1))
        await work.commands(work.queue)

    with pytest.raises(ValueError, match="unknown command"):
        asyncio.run(run())


@pytest.mark.parametrize("backlog, batches_come, at_most, at_least", [(100, True, 4, 1), (0, True, 60, 7),
                                                                       (100, False, 60, 6)])
def test_refreshes_pause_for_their_share_only_while_events_wait(backlog: int, batches_come: bool, at_most: int,
                                                                at_least: int) -> None:
    """A refresh that takes 40 ms at a 20 % share: 160 ms pauses while events wait, 10 ms ones when none do. A
    backlog the last batch reported goes stale when no batch follows (after 0.25 s): the lists go out then."""
    work = scorer(refresh_interval=0.01, refresh_share=0.2)
    work.backlog, work.backlog_at = backlog, time.monotonic()
    calls: list[float] = []

    async def slow_refresh() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.04)  # CPU-bound, as scoring is

    work.refresh = slow_refresh  # type: ignore[method-assign]

    async def batches() -> None:
        while batches_come:
            work.backlog_at = time.monotonic()
            await asyncio.sleep(0.05)

    async def run() -> None:
        tasks = [asyncio.create_task(work.refresher()), asyncio.create_task(batches())]
        await asyncio.sleep(0.6)
        for task in tasks:
            task.cancel()

    asyncio.run(run())
    assert at_least <= len(calls) <= at_most


def test_the_fetcher_looks_again_within_50_ms_not_after_faust_s_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust's fetcher sleeps 1 s when no partition is fetchable (none assigned yet, or every stream buffer
    full behind a busy agent) and long-polls the rest for 1 s: a draining worker sat idle for up to 1 s."""
    waits: list[float] = []

    async def faust_wait(self: object, timeout: float) -> tuple[dict, set]:
        waits.append(timeout)
        return {}, set()

    monkeypatch.setattr(transport.driver.Consumer, "_wait_next_records", faust_wait)
    consumer = transport.Consumer.__new__(transport.Consumer)  # the fetch path alone, no Faust app
    consumer.flow_active, consumer.app = True, SimpleNamespace(client_only=False)
    consumer._active_partitions, consumer._paused_partitions = set(), set()

    async def look() -> float:
        consumer._stopped = asyncio.Event()
        started = time.perf_counter()
        assert await consumer._wait_next_records(1.0) == ({}, set())
        return time.perf_counter() - started

    assert asyncio.run(look()) < 0.5 and waits == []  # nothing fetchable: looked again soon, Faust's path skipped
    consumer._active_partitions = {TP("orders", 0)}
    asyncio.run(look())
    assert waits == [transport.Consumer.IDLE_POLL]  # fetchable: Faust's path, with a short wait


def test_a_batch_of_dead_letters_is_one_log_line_and_every_letter(caplog: pytest.LogCaptureFixture) -> None:
    strays = [(k, Order(order_id=f"c{k}", items=[{"item_id": "A"}], status="cancelled", ts=at(k))) for k in range(3)]
    work = scorer(cancel_hold=0)
    with caplog.at_level(logging.WARNING, logger="streaming.scorer"):
        asyncio.run(work.apply(*forwarded(*strays)[1:]))
    assert [dict(h)["offset"] for *_, h in work.out.producer.sent] == [b"0", b"1", b"2"]
    lines = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert len(lines) == 1 and "cancels unknown order c0" in lines[0] and "and 2 more in this batch" in lines[0]


def test_bundle_updates_are_signed_and_the_api_serves_only_signed_ones() -> None:
    """With ``stream.signing_key`` the worker signs each bundle update (key and value) and the API's feed
    refuses a record without the signature, with a forged one, or one moved to another item's key."""
    from kafka.consumer.fetcher import ConsumerRecord

    from serving.feed import FeedTopics, ViewFeed
    from serving.view import BundleView

    work = scorer(signing_key="s3cret")
    placed = Order(order_id="o1", items=[{"item_id": "A"}, {"item_id": "B"}], ts=at(1))
    asyncio.run(work.apply(*forwarded((0, placed))[1:]))
    asyncio.run(work.refresh())
    sent = {key: (value, dict(headers)) for topic, key, value, headers in work.out.producer.sent}
    assert set(sent) == {b"A", b"B"} and all(len(h["signature"]) == 64 for _, h in sent.values())

    def record(key: bytes, value: bytes, headers: dict) -> ConsumerRecord:
        return ConsumerRecord("updates", 0, None, 0, 0, 0, key, value, list(headers.items()), None, 0, 0, 0)

    feed = ViewFeed(BundleView(), "unused", FeedTopics("catalog", "updates"), signing_key=b"s3cret")
    value, headers = sent[b"A"]
    feed._handlers["updates"](record(b"A", value, headers))
    assert [c.item_id for c in feed.view.entries["A"].complements] == ["B"]
    forged = value.replace(b'"B"', b'"X"')
    for bad in (record(b"A", forged, headers), record(b"B", value, headers), record(b"A", value, {}),
                record(b"A", value, {"signature": b"0" * 64})):
        with pytest.raises(ValueError, match="without a valid signature"):
            feed._handlers["updates"](bad)
    unsigned = ViewFeed(BundleView(), "unused", FeedTopics("catalog", "updates"))  # no key: served as is
    unsigned._handlers["updates"](record(b"A", forged, {}))
    assert [c.item_id for c in unsigned.view.entries["A"].complements] == ["X"]


def test_two_tasks_share_orders_through_the_repartition_and_a_repeat_of_it_is_skipped(tmp_path: Path) -> None:
    """An order's change for another task's items goes out on repartition; applied there, the two tasks hold
    what one store holds. The sender restarted from an older checkpoint sends the same records again: skipped."""
    from graph.store import GraphStore
    from streaming import repartition

    items = [f"i{k}" for k in range(8)]
    orders = [Order(order_id=f"o{n}", items=[{"item_id": i} for i in items[n % 3:n % 3 + 4]], ts=at(n))
              for n in range(6)]
    work = scorer(tmp_path, partitions=2)
    records = [Record("orders", n % 2, n // 2, None, encode(o), 1_000.0) for n, o in enumerate(orders)]

    async def run() -> list:
        await work.apply(records, [graph_input(o) for o in orders])
        sent = [(k, value) for topic, key, value, headers in work.out.producer.sent if topic == "repartition"
                for k in [repartition.item_partition(key.decode(), 2)]]
        copies = sent + sent  # once, then again (a restarted sender)
        routed = [Record("repartition", q, n, None, value, 1_000.0) for n, (q, value) in enumerate(copies)]
        await work.apply(routed, [repartition.decode(r.value) for r in routed])
        return sent

    sent = asyncio.run(run())
    assert sent and all(q in (0, 1) for q, _ in sent)
    whole = GraphStore(GraphConfig())
    whole.apply_all(orders)
    store = work.state.store
    for a in items:
        for b in items:
            expected, got = whole.co_purchase(a, b), store.co_purchase(a, b)
            assert (expected and expected.count) == (got and got.count), (a, b)
    assert store.item_order_counts().tolist() == [whole.item_order_counts()[whole.items.index[i]]
                                                  for i in store.items.ids]
    metrics = work.state.metrics  # events counted once, their shares apart (the repeats skipped: not counted)
    assert metrics.value("bundlegnn_worker_events_total", {"kind": "order"}) == len(orders)
    assert metrics.value("bundlegnn_worker_routed_total", {"kind": "order_share"}) == len(sent)
    stopped(work)


def test_items_stay_pending_on_the_metrics_until_their_lists_are_handed_to_the_producer() -> None:
    """A refresh takes the pending items at its start; the gauge still counts each until its list is sent
    (a long refresh once read as an idle worker: nothing pending, nothing taken)."""
    work = scorer()
    seen: list[float] = []
    producer = work.out.producer
    send = producer.send

    async def watching(topic, key=None, value=None, headers=None, partition=None):
        if topic == work.names.bundle_updates:
            seen.append(work.state.metrics.value("bundlegnn_worker_pending_items"))
        return await send(topic, key, value, headers, partition)

    producer.send = watching

    async def run() -> None:
        await work.apply(*forwarded((0, Order(order_id="o1", items=[{"item_id": "A"}, {"item_id": "B"}],
                                              ts=at(1))))[1:])
        assert work.state.metrics.value("bundlegnn_worker_pending_items") == 2
        await work.refresh()

    asyncio.run(run())
    assert seen == [2, 1] and work.state.metrics.value("bundlegnn_worker_pending_items") == 0


def _deaf() -> None:
    """A scoring process that ignores SIGTERM, as the real one does, and never answers."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


def test_a_scoring_process_that_does_not_stop_in_time_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    """The scoring process ignores SIGTERM (a group kill must not end it before its checkpoint), so the Faust
    side's last resort after the stop timeout is SIGKILL: a terminate() would leave it running."""
    import multiprocessing

    from streaming.scorer import ScorerLink

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_deaf, daemon=True)
    process.start()
    time.sleep(1.0)  # its SIGTERM handler is set
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="streaming.scorer"):
        code = asyncio.run(ScorerLink(process, ours).stop("test", timeout=1.0))
    assert code == -9 and not process.is_alive() and time.monotonic() - began < 5
    assert "did not stop within 1 s; killing it" in caplog.text


def test_kafka_python_checks_record_crcs_in_c() -> None:
    """pyproject asks for kafka-python's crc32c extra: its pure-Python CRC-32C of every record batch took most
    of the time of reading the event topics (Online Retail II full: 12.4 s, 5.6 s in C) and of replaying them."""
    from kafka.record import util

    assert util.crc32c_c is not None, "pip install 'kafka-python[crc32c]'"
    assert util.calc_crc32c(memoryview(b"123456789")) == 0xE3069283  # the CRC-32C check value
