"""``bundlegnn demo``: the whole system on one machine, on real data.

Starts the embedded broker, trains a model (or loads the newest one), starts
the stream worker and the HTTP API as their own processes (the same commands a
deployment runs), replays the dataset through Kafka, prints real bundles with
their reasons, then sends a burst of new orders and shows a bundle change
live. Ctrl-C stops everything.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bundlegnn.config import Settings
from bundlegnn.net import bound_socket

ROOT = Path(__file__).resolve().parents[1]


class Child:
    """A ``bundlegnn`` subcommand in its own process, its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "bundlegnn.cli", *args], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with tqdm(desc=f"start {self.name}", bar_format="{desc}: {elapsed}", disable=None) as bar:
            while marker not in self.log.read_text(errors="replace"):
                if self.process.poll() is not None:
                    tail = "\n".join("    " + line for line in self.log.read_text(errors="replace").splitlines()[-5:])
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}; the end of {self.log}:\n"
                                       f"{tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")
                time.sleep(0.2)
                bar.update(0)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _port_taken(host: str, port: int) -> bool:
    """Whether ``serve`` would fail to listen on ``host:port``."""
    try:
        bound_socket(host, port).close()
    except OSError:
        return True
    return False


def _path(item_id: str) -> str:
    """``item_id`` as a URL path segment (ids may hold '/', '?', '#')."""
    return quote(item_id, safe="")


def _say(text: str = "") -> None:
    typer.echo(text)


def _show_bundles(body: dict) -> None:
    for n, bundle in enumerate(body["bundles"], 1):
        names = " + ".join(m["title"] for m in bundle["items"])
        label = f", {bundle['label']!r}" if bundle.get("label") else ""
        _say(f"  bundle {n} (score {bundle['score']:.3f}{label}): {names}")
        for why in bundle["why"][:4]:
            _say(f"      why: {why}")


def _worker_progress(metrics: httpx.Client) -> tuple[bool, float, float]:
    """Whether the worker is idle (no consumer lag, no item awaiting its list), how many input events it took
    (applied or dead-lettered) and how many repartition records (other tasks' shares of them) it applied."""
    samples = [s for family in text_string_to_metric_families(metrics.get("/metrics").text) for s in family.samples]
    lag = sum(s.value for s in samples if s.name == "bundlegnn_worker_consumer_lag")
    pending = sum(s.value for s in samples if s.name == "bundlegnn_worker_pending_items")
    taken = sum(s.value for s in samples if s.name in ("bundlegnn_worker_events_total",
                                                        "bundlegnn_worker_dead_letters_total"))
    routed = sum(s.value for s in samples if s.name == "bundlegnn_worker_routed_total")
    return lag == 0 and pending == 0, taken, routed


def _wait_caught_up(http: httpx.Client, metrics: httpx.Client, sent: int, quiet_s: float, timeout: float) -> dict:
    """Wait until the worker has taken the ``sent`` events (applied or dead-lettered), has been idle for
    ``quiet_s`` since (no lag, nothing taken or routed, nothing pending; a lag measurement must fall inside
    it) and the API's view has had its last update for a second and its feed last found it caught up
    (``view_behind`` 0; tansu's short end offsets can make that read low, hence the rest): every replayed
    event is then in the lists the API serves. (Quiet alone is not enough: before the worker's first fetch,
    and while it publishes a long refresh, a pause looks like the end.)"""
    deadline = time.monotonic() + timeout
    still_since, last = time.monotonic(), (-1.0, -1.0)
    with tqdm(desc="worker → API", unit=" lists", disable=None) as bar:
        while True:
            health = http.get("/healthz").json()
            bar.n = health["complement_lists"]
            bar.refresh()
            idle, taken, routed = _worker_progress(metrics)
            if not idle or (taken, routed) != last or taken < sent:
                still_since, last = time.monotonic(), (taken, routed)
            age = health["last_update_age_s"]
            if (health["status"] == "ok" and time.monotonic() - still_since >= quiet_s and age is not None
                    and age >= 1.0 and health["view_behind"] == 0):
                return health
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker has not caught up after {timeout:.0f} s ({taken:.0f} events taken "
                                   f"of {sent} sent, idle: {idle}): {health}")
            time.sleep(0.5)


BURST = 25


def _live_bursts(http: httpx.Client, bootstrap: str, settings: Settings, anchor: str, partner: str, known: int,
                 after: datetime) -> dict:
    """Send bursts of orders holding both items until ``partner`` is in one of ``anchor``'s bundles."""
    from graph.events import Order, OrderLine
    from streaming.producer import EventProducer

    sent = 0
    with EventProducer(bootstrap, settings.stream.topics) as producer:
        for _ in range(8):
            for _ in range(BURST):
                sent += 1
                producer.send(Order(order_id=f"demo-{int(time.time())}-{sent}", user_id="demo-shopper",
                                    ts=after + timedelta(minutes=sent),
                                    items=[OrderLine(item_id=anchor), OrderLine(item_id=partner)]))
            producer.flush()
            started, deadline = time.perf_counter(), time.perf_counter() + 60
            while True:  # until the API shows the anchor's list with every order sent so far
                comps = http.get(f"/items/{_path(anchor)}/complements", params={"k": 100}).json()["complements"]
                rank = next((n for n, c in enumerate(comps, 1) if c["item_id"] == partner and c["orders"] == known + sent),
                            None)
                if rank is not None:
                    break
                if time.perf_counter() > deadline:
                    seen = next((c["orders"] for c in comps if c["item_id"] == partner), "not listed")
                    raise RuntimeError(f"{sent} orders of {anchor} + {partner} not visible in the API after 60 s: "
                                       f"it lists {seen} orders of both, {known} before the bursts")
                time.sleep(0.05)
            body = http.get(f"/items/{_path(anchor)}/bundles", params={"k": 3, "size": 3}).json()
            where = [n for n, b in enumerate(body["bundles"], 1) if partner in [m["item_id"] for m in b["items"]]]
            _say(f"  {sent:3d} orders sent → visible in the API after {time.perf_counter() - started:.2f} s: "
                 f"complement #{rank}" + (f", in bundle {where[0]}" if where else ", in no bundle yet"))
            if where:
                return body
    raise RuntimeError(f"{partner} did not reach the bundles of {anchor} after {sent} orders")


def run_demo(settings: Settings, config: Path | None, retrain: bool, hold: bool | None) -> None:
    from graph.events import Order
    from streaming.broker import EmbeddedBroker, create_topics, free_port
    from streaming.producer import EventProducer, replay
    from training.artifact import latest_artifact
    from training.datasets import in_time_order, read_events

    state = settings.paths.state_dir
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "demo-logs"
    logs.mkdir(exist_ok=True)
    cfg = ["--config", str(config)] if config else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    children: list[Child] = []
    data = settings.data.path
    if not data.exists():
        raise typer.BadParameter(f"dataset not found: {data}")
    started = time.perf_counter()

    def stop_on_sigterm(*_: object) -> None:  # a `kill` stops the demo as cleanly as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    broker = EmbeddedBroker(log_path=logs / "broker.log")
    # the broker keeps its topics in memory: a worker checkpoint of an earlier demo's topics would skip the
    # offsets it holds on the new, empty ones
    shutil.rmtree(settings.paths.checkpoints, ignore_errors=True)
    try:
        _say("1/6 embedded Kafka broker (tansu, memory storage)")
        broker.start()
        settings.paths.broker_address.write_text(broker.bootstrap)
        create_topics(broker.bootstrap, settings.stream.topics.layout(settings.stream.partitions))
        _say(f"    on {broker.bootstrap}")

        model = None if retrain else latest_artifact(settings.paths.model_store)
        if model is None:
            _say(f"2/6 training the GNN on {data} (one-off; later runs load it, --retrain trains again)")
            subprocess.run([sys.executable, "-m", "bundlegnn.cli", "train", *cfg], cwd=ROOT, env=env, check=True)
            model = latest_artifact(settings.paths.model_store)
        else:
            _say(f"2/6 loading the newest model: {model}")
        assert model is not None

        _say("3/6 stream worker (Faust) and HTTP API")
        metrics_port = settings.stream.metrics_port or free_port()  # the demo watches the worker's progress
        worker = Child("worker", ["worker", *cfg, "--model", str(model)], logs / "worker.log",
                       {**env, "BUNDLEGNN_STREAM__METRICS_PORT": str(metrics_port)})
        children.append(worker)
        worker.wait_for("Worker]: Ready", 180)
        settings.paths.api_address.unlink(missing_ok=True)
        serving = settings.serving
        port = [] if serving.port == 0 or not _port_taken(serving.host, serving.port) else ["--port", "0"]
        if port:  # another program has it (a second demo, a dev server): the URLs below name the port taken
            _say(f"    port {serving.port} is in use: the API listens on a free one")
        api = Child("api", ["serve", *cfg, "--model", str(model), *port], logs / "api.log", env)
        children.append(api)
        api.wait_for("bundle API on", 120)
        url = settings.paths.api_address.read_text().strip()

        _say(f"4/6 replaying {data.name} through Kafka")
        events = in_time_order(read_events(settings.data))
        orders = collections.Counter(i for e in events if isinstance(e, Order) for i in e.item_ids)
        with EventProducer(broker.bootstrap, settings.stream.topics) as producer:
            replay(events, producer, total=len(events))
        with httpx.Client(base_url=url, timeout=10) as http, \
                httpx.Client(base_url=f"http://127.0.0.1:{metrics_port}", timeout=10) as metrics:
            # quiet for longer than the worker's lag measurements are apart: one falls inside it
            health = _wait_caught_up(http, metrics, len(events), quiet_s=settings.stream.metrics_interval + 1.0,
                                     timeout=600)
            _say(f"    the API serves {health['complement_lists']} complement lists, model {health['model_version']}")

            _say("5/6 real bundles")
            for item_id, _ in orders.most_common(3):
                body = http.get(f"/items/{_path(item_id)}/bundles", params={"k": 2, "size": 3}).json()
                _say(f"\n  GET {url}/items/{item_id}/bundles?k=2&size=3   anchor: {body['anchor']['title']}")
                _show_bundles(body)

            _say("\n6/6 bursts of new orders, live")
            anchor = orders.most_common(1)[0][0]
            listed = http.get(f"/items/{_path(anchor)}/complements", params={"k": 100}).json()
            in_bundles = {m["item_id"] for b in http.get(f"/items/{_path(anchor)}/bundles", params={"k": 3, "size": 3})
                          .json()["bundles"] for m in b["items"]}
            outside = [(n, c) for n, c in enumerate(listed["complements"], 1) if c["item_id"] not in in_bundles]
            rank, chosen = outside[len(outside) // 2]
            partner, known = chosen["item_id"], chosen["orders"]
            _say(f"  {chosen['title']!r} is complement #{rank} of {listed['item']['title']!r} ({known} orders "
                 f"together) but in none of its bundles; sending new orders of both, {BURST} at a time")
            last_ts = max(e.ts for e in events)
            body = _live_bursts(http, broker.bootstrap, settings, anchor, partner, known, last_ts)
            _show_bundles(body)
        _say(f"\ndemo ready in {time.perf_counter() - started:.0f} s. Bundle explorer: {url}/ui   API docs: {url}/docs   "
             f"metrics: {url}/metrics")
        _say(f"logs: {logs}")
        if hold if hold is not None else sys.stdin.isatty():
            _say("worker, API and broker keep running; Ctrl-C stops everything")
            while all(c.process.poll() is None for c in children):
                time.sleep(1)
    except KeyboardInterrupt:
        _say("\nstopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in reversed(children):
            child.stop()
        broker.stop()
        settings.paths.broker_address.unlink(missing_ok=True)
