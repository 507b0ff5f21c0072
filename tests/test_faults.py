"""Faults on the real broker: kill -9 of the worker's processes at random points while events stream in.

Every run ends with the worker's graph equal to the batch build of the same events (orders, co-purchase pairs
and their weights, interactions, catalog) and every dead letter published once. The short run is part of
``make test``; the long one (``-m slow``) kills 20 times.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from graph.events import Interaction, ItemUpserted, Order
from graph.store import GraphConfig, GraphStore
from streaming import checkpoint
from tests.conftest import DATA, retail_events
from tests.kafka_helpers import Reader, WorkerProcess, stream_env, topic
from tests.test_streaming import edges, producer_for, user_edges

pytestmark = pytest.mark.broker
SAMPLE = DATA / "online_retail_ii_sample.csv.gz"  # the first 4,000 rows of online_retail_ii
BAD = [b"{not json", b'{"type": "order", "order_id": "x", "items": [], "ts": "2010-01-01T00:00:00Z"}', b"[]"]


def stream_of_events() -> list[ItemUpserted | Order | Interaction]:
    """The sample's catalog and orders, and an interaction with an event id after every fifth order (a tenth of
    them sent twice: the copy counts once)."""
    out: list = []
    for n, event in enumerate(retail_events(SAMPLE)):
        out.append(event)
        if isinstance(event, Order) and event.user_id and n % 5 == 0:
            seen = Interaction(user_id=event.user_id, item_id=event.items[0].item_id, kind="view", ts=event.ts,
                               event_id=f"view-{n}")
            out += [seen, seen] if n % 50 == 0 else [seen]
    return out


def kill(worker: WorkerProcess, target: str) -> None:
    """SIGKILL the Faust process, its scoring process or both; wait until the worker is gone."""
    assert worker.process is not None
    scoring = worker.scoring_processes()
    if target in ("scoring", "both"):
        for pid in scoring:
            os.kill(pid, signal.SIGKILL)
    if target in ("faust", "both"):
        worker.process.kill()
    worker.process.wait(60)


def fault_run(broker: str, tmp_path: Path, kills: int, seed: int, pause: int | None = None, workers: int = 1) -> None:
    """``kills`` kills at random points of a stream of the sample's events; ``pause``: the broker's pid, stopped
    (SIGSTOP) for 30 s halfway through; ``workers``: how many share the tasks (a kill hits one of them, so its
    tasks move to the others and back while the group rebalances)."""
    rng = random.Random(seed)
    env = stream_env(broker, tmp_path / "state")
    env.update({"BUNDLEGNN_STREAM__ENCODE_TEXT": "false", "BUNDLEGNN_STREAM__CHECKPOINT_INTERVAL": "0.5",
                "BUNDLEGNN_STREAM__BATCH_SIZE": "50", "BUNDLEGNN_STREAM__CANCEL_HOLD": "0"})
    events = stream_of_events()
    expected = GraphStore(GraphConfig(order_window_days=400))
    expected.apply_all(events)
    group = [WorkerProcess(env, tmp_path / f"worker{n}.log", "--model", "none").start() for n in range(workers)]
    targets = ["faust", "scoring", "both"]
    bursts = range(0, len(events), 20)
    pace = (9.0 * kills + 3.0) / len(bursts)  # the stream goes on through every kill and restart (~6 s each)
    sent_bad: list[int] = []

    stop = threading.Event()  # the test failed: stop sending

    def produce() -> None:
        with producer_for(env, broker) as producer:
            for start in bursts:
                if stop.is_set():
                    return
                for event in events[start : start + 20]:
                    producer.send(event)
                if start % 60 == 0:
                    producer.send_raw(topic(env, "orders"), BAD[len(sent_bad) % len(BAD)], key=f"bad-{start}".encode())
                    sent_bad.append(start)
                producer.flush()
                time.sleep(pace)

    sender = threading.Thread(target=produce, name="producer", daemon=True)
    sender.start()
    try:
        for k in range(kills):
            time.sleep(rng.uniform(0.2, 2.0))
            worker = rng.choice(group)
            kill(worker, targets[k] if k < 3 else rng.choice(targets))
            worker.start()
            if pause is not None and k == kills // 2:
                os.kill(pause, signal.SIGSTOP)
                time.sleep(30)
                os.kill(pause, signal.SIGCONT)
        sender.join(600)
        assert not sender.is_alive()
        # once every placed order is in, stop cleanly: the stop writes the graph for the comparison
        wait_until_caught_up(tmp_path / "state" / "checkpoint", expected)
    finally:
        stop.set()
        codes = [w.stop() for w in group]
    assert codes == [0] * workers
    got = checkpoint.union(tmp_path / "state" / "checkpoint")  # the stop wrote its tasks' last checkpoints
    for ours, batch in ((edges(got), edges(expected)), (user_edges(got), user_edges(expected))):
        assert {k: c for k, (c, _) in ours.items()} == {k: c for k, (c, _) in batch.items()}
        assert {k: w for k, (_, w) in ours.items()} == pytest.approx({k: w for k, (_, w) in batch.items()})
    assert len(edges(expected)) > 1000 and len(user_edges(expected)) > 100
    assert {k: got.catalog[r] for k, r in got.items.index.items()} == \
        {k: expected.catalog[r] for k, r in expected.items.index.items()}
    dead = Reader(broker, topic(env, "dead_letters"))
    try:
        letters = [(dict(r.headers)["partition"], dict(r.headers)["offset"]) for r in dead.drain(3.0)]
    finally:
        dead.close()
    expected_letters = len(sent_bad) + expected.stats.cancellations_unmatched  # the bad messages and stray cancellations
    assert len(set(letters)) == expected_letters, "a dead letter was lost"
    assert len(letters) == expected_letters, "a dead letter was published twice"


def caught_up(path: Path, expected: GraphStore) -> bool:
    """Whether the current task checkpoints under ``path`` hold as many item orders and co-purchase pairs as
    ``expected``."""
    got = checkpoint.union(path)
    return got is not None and int(got.item_order_counts().sum()) == int(expected.item_order_counts().sum()) and \
        got.num_co_edges() == expected.num_co_edges()


def wait_until_caught_up(path: Path, expected: GraphStore, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not caught_up(path, expected) and time.monotonic() < deadline:
        time.sleep(0.5)


def test_kill_9_of_either_process_or_both_loses_and_doubles_nothing(broker: str, tmp_path: Path) -> None:
    fault_run(broker, tmp_path, kills=3, seed=0)


@pytest.mark.slow
def test_twenty_random_kills_and_a_paused_broker_lose_and_double_nothing(tmp_path: Path) -> None:
    from streaming.broker import EmbeddedBroker

    with EmbeddedBroker() as own:  # its own broker: the pause must not reach other tests
        assert own.process is not None
        fault_run(own.bootstrap, tmp_path, kills=20, seed=1, pause=own.process.pid)


@pytest.mark.slow
def test_kills_of_one_of_two_workers_while_their_group_rebalances_lose_and_double_nothing(tmp_path: Path) -> None:
    from streaming.broker import EmbeddedBroker

    with EmbeddedBroker() as own:
        fault_run(own.bootstrap, tmp_path, kills=10, seed=2, workers=2)



def test_workers_joining_and_leaving_mid_stream_hold_together_the_graph_of_one(broker: str, tmp_path: Path) -> None:
    """Two workers share six tasks; a third joins mid-stream, then one leaves (a clean stop): the tasks move
    through their checkpoints, and what the workers hold together at the end equals the batch build."""
    env = stream_env(broker, tmp_path / "state")
    env.update({"BUNDLEGNN_STREAM__ENCODE_TEXT": "false", "BUNDLEGNN_STREAM__CHECKPOINT_INTERVAL": "0.5",
                "BUNDLEGNN_STREAM__BATCH_SIZE": "50", "BUNDLEGNN_STREAM__CANCEL_HOLD": "0",
                "BUNDLEGNN_STREAM__PARTITIONS": "6"})
    events = stream_of_events()
    expected = GraphStore(GraphConfig(order_window_days=400))
    expected.apply_all(events)
    workers = [WorkerProcess(env, tmp_path / f"worker{n}.log", "--model", "none") for n in range(3)]
    workers[0].start()
    workers[1].start()
    bursts = range(0, len(events), 40)

    def produce() -> None:
        with producer_for(env, broker) as producer:
            for start in bursts:
                for event in events[start : start + 40]:
                    producer.send(event)
                producer.flush()
                time.sleep(12.0 / len(bursts))

    sender = threading.Thread(target=produce, name="producer", daemon=True)
    sender.start()
    try:
        time.sleep(2)
        workers[2].start()  # joins
        time.sleep(2)
        assert workers[1].stop() == 0  # leaves
        sender.join(120)
        assert not sender.is_alive()
        wait_until_caught_up(tmp_path / "state" / "checkpoint", expected)
    finally:
        codes = [w.stop() for w in workers if w.process is not None]
    assert codes == [0, 0, 0]
    took = [line for line in workers[2].output().splitlines() if "from its checkpoint (read in" in line]
    assert took and "revoked and checkpointed" in workers[1].output()  # tasks moved through their checkpoints
    got = checkpoint.union(tmp_path / "state" / "checkpoint")
    for ours, batch in ((edges(got), edges(expected)), (user_edges(got), user_edges(expected))):
        assert {k: c for k, (c, _) in ours.items()} == {k: c for k, (c, _) in batch.items()}
        assert {k: w for k, (_, w) in ours.items()} == pytest.approx({k: w for k, (_, w) in batch.items()})
    assert len(edges(expected)) > 1000
    assert {k: got.catalog[r] for k, r in got.items.index.items()} == \
        {k: expected.catalog[r] for k, r in expected.items.index.items()}


def test_sigterm_to_the_whole_group_stops_the_worker_after_its_last_checkpoint(broker: str, tmp_path: Path) -> None:
    """systemd (its control group) and `bundlegnn demo` send SIGTERM to both of the worker's processes at once:
    the scoring process leaves the stop to the Faust app, so it writes its last checkpoint and exits cleanly
    instead of dying of the signal before it."""
    env = stream_env(broker, tmp_path / "state")
    env["BUNDLEGNN_STREAM__ENCODE_TEXT"] = "false"
    order = Order(order_id="o1", user_id="u1", ts="2024-01-01T00:00:00Z", items=[{"item_id": "a"}, {"item_id": "b"}])
    expected = GraphStore(GraphConfig(order_window_days=400))
    expected.apply_all([order])
    worker = WorkerProcess(env, tmp_path / "worker.log", "--model", "none").start()
    assert worker.process is not None
    with producer_for(env, broker) as producer:
        producer.send(order)
        producer.flush()
    wait_until_caught_up(tmp_path / "state" / "checkpoint", expected)
    for pid in [*worker.scoring_processes(), worker.process.pid]:
        os.kill(pid, signal.SIGTERM)
    assert worker.process.wait(60) == 0
    log = worker.output()
    assert "scoring process stopping" in log and "the scoring process exited with" not in log
    got = checkpoint.union(tmp_path / "state" / "checkpoint")
    assert got is not None and edges(got) == edges(expected)
