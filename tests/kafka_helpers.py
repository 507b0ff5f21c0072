"""Helpers of the tests that run against the real embedded broker: a worker process and a reader."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from kafka import KafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]


def stream_env(bootstrap: str, state_dir: Path, app_id: str | None = None) -> dict[str, str]:
    """Environment for a worker/replay on ``bootstrap`` with topics of its own (one test never sees another's)."""
    tag = app_id or f"t{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BUNDLEGNN_STREAM__BOOTSTRAP_SERVERS": bootstrap, "BUNDLEGNN_STREAM__APP_ID": tag,
           "BUNDLEGNN_STREAM__SESSION_TIMEOUT": "3", "BUNDLEGNN_STREAM__HEARTBEAT_INTERVAL": "0.5",
           "BUNDLEGNN_STREAM__REBALANCE_TIMEOUT": "3", "BUNDLEGNN_STREAM__PARTITIONS": "2",
           "BUNDLEGNN_PATHS__STATE_DIR": str(state_dir), "BUNDLEGNN_PATHS__MODEL_STORE": str(state_dir / "models"),
           "BUNDLEGNN_TRAINING__DEVICE": "cpu",
           # the Online Retail II files are two workbook sheets one after the other, replayed in file order
           "BUNDLEGNN_GRAPH__ORDER_WINDOW_DAYS": "400"}
    for name in ("catalog", "interactions", "orders", "repartition", "bundle_updates", "dead_letters", "model_updates"):
        env[f"BUNDLEGNN_STREAM__TOPICS__{name.upper()}"] = f"{tag}-{name.replace('_', '-')}"
    return env


def replay(env: dict[str, str], data: Path) -> int:
    """``bundlegnn replay --data data`` (must succeed); how many events it sent."""
    sent = subprocess.run([sys.executable, "-m", "bundlegnn.cli", "replay", "--data", str(data)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr[-2000:]
    return json.loads(sent.stdout.splitlines()[-1])["sent"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TLSFront:
    """A TLS terminator in front of a plaintext broker (tansu serves no TLS), as a managed Kafka's listener is:
    what a client sends over TLS to ``port`` goes on to ``target`` on 127.0.0.1. The server ``context`` decides
    what clients must show (a certificate, for mutual TLS). The broker must advertise ``port``."""

    def __init__(self, target: int, context: ssl.SSLContext) -> None:
        self.target, self.context = target, context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-front", daemon=True)
        self.port = 0

    def start(self) -> "TLSFront":
        self.thread.start()
        serving = asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        self.server = asyncio.run_coroutine_threadsafe(serving, self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            broker_in, broker_out = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_out.close()
            return
        await asyncio.gather(_pipe(client_in, broker_out), _pipe(broker_in, client_out), return_exceptions=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus endpoint's samples: (name, sorted labels) → value."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def topic(env: dict[str, str], name: str) -> str:
    return env[f"BUNDLEGNN_STREAM__TOPICS__{name.upper()}"]


class CliProcess:
    """A ``bundlegnn`` subcommand in a subprocess; ``start`` returns once its log shows ``ready``."""

    def __init__(self, env: dict[str, str], log: Path, command: str, *args: str, ready: str) -> None:
        self.env, self.log, self.command, self.args, self.ready = env, log, command, args, ready
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0  # the log's size when the process was launched: its ready line comes after

    def start(self, timeout: float = 90.0) -> "CliProcess":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "CliProcess":
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "bundlegnn.cli", self.command, *self.args],
                                            cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 90.0) -> "CliProcess":
        assert self.process is not None
        offset = self._offset
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if self.ready in text:
                return self
            if self.process.poll() is not None:
                raise AssertionError(f"{self.command} exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"{self.command} not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class WorkerProcess(CliProcess):
    """``bundlegnn worker``, ready once Faust says so."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        super().__init__(env, log, "worker", *args, ready="Worker]: Ready")

    def scoring_processes(self) -> list[int]:
        """The pid of the worker's scoring process (a ``spawn`` child of the Faust process), in a list."""
        assert self.process is not None
        return [pid for pid in children(self.process.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process (Linux /proc; 0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reader:
    """Reads a topic from the beginning without a consumer group."""

    def __init__(self, bootstrap: str, name: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=200)
        self.name = name
        self.records: list = []
        self._assigned = False

    def _assign(self, deadline: float) -> None:
        while not self._assigned and time.monotonic() < deadline:
            parts = self.consumer.partitions_for_topic(self.name)
            if parts:
                tps = [TopicPartition(self.name, p) for p in parts]
                self.consumer.assign(tps)
                self.consumer.seek_to_beginning(*tps)
                self._assigned = True
            else:
                time.sleep(0.2)

    def wait_for(self, predicate: Callable[[object], bool], timeout: float = 30.0) -> object:
        """The first record (old or new) that satisfies ``predicate``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        self._assign(deadline)
        checked = 0
        while True:
            for record in self.records[checked:]:
                if predicate(record):
                    return record
            checked = len(self.records)
            if time.monotonic() >= deadline:
                break
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
        seen = "\n".join(f"  {r.partition}@{r.offset} {r.key!r}: {r.value[:160]!r}" for r in self.records[-10:])
        raise AssertionError(f"no matching record on {self.name} within {timeout} s; last of {len(self.records)} read:\n{seen}")

    def drain(self, seconds: float) -> list:
        """Every record on the topic after reading it for ``seconds``."""
        deadline = time.monotonic() + seconds
        self._assign(deadline)
        while time.monotonic() < deadline:
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
        return self.records

    def end(self, timeout: float = 30.0) -> int:
        """Records on the topic so far (the sum of its partitions' end offsets), read without fetching them."""
        self._assign(time.monotonic() + timeout)
        return sum(self.consumer.end_offsets(list(self.consumer.assignment())).values())

    def read_to_end(self, timeout: float = 120.0, quiet: float = 1.0) -> list:
        """Every record on the topic: up to its end offsets as of this call, then until ``quiet`` seconds bring
        nothing new (tansu reports end offsets short after multi-record batches; measured: 14,511 of 14,773)."""
        self._assign(time.monotonic() + timeout)
        ends = self.consumer.end_offsets(list(self.consumer.assignment()))
        deadline = time.monotonic() + timeout
        while any(self.consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not read to its end within {timeout} s")
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
        since = time.monotonic()
        while time.monotonic() - since < quiet:
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend(batch)
                since = time.monotonic()
        return self.records

    def close(self) -> None:
        self.consumer.close()


def settle(updates: Reader, idle: float = 3.0, timeout: float = 600.0, read: bool = True,
           start: int | None = None) -> list:
    """Wait until the worker has published something (after ``start``, the topic's end offset before the work
    began; default: now) and then nothing for ``idle`` seconds; every record (none unless ``read``).

    Only the topic's end offsets are polled while the worker works: reading
    the updates as they come (kafka-python, in this process) took about as
    much CPU as the worker itself, on the same two cores. Timestamps are
    the records' own, so reading them afterwards changes nothing.
    """
    last = updates.end()
    start = last if start is None else start
    since, deadline = time.monotonic(), time.monotonic() + timeout
    while last == start or time.monotonic() - since < idle:
        if time.monotonic() > deadline:
            raise AssertionError(f"bundle-updates still at {last} records after {timeout} s")
        time.sleep(0.25)
        end = updates.end()
        if end != last:
            last, since = end, time.monotonic()
    return updates.read_to_end() if read else []
