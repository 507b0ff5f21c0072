"""`make bench`, streaming part: workers' throughput, CPU per order, latency, checkpoints and restarts.

Starts the embedded broker and one ``bundlegnn worker`` (no model, no text
encoding: the stream path alone; four tasks), loads the catalog, then for 1× and 10× the
real data (the 10× copy repeats every order with new order and user ids,
each copy shifted in time by the data's span, so basket sizes and item
popularity keep their statistics):

* throughput: the worker is stopped, all orders are produced into the
  topic (a backlog, so the producer's speed does not count), the worker is
  started again and drains it. Between the first bundle update that
  reflects an order and the last one, ``graph_version`` (one per applied
  order) rose by N in T seconds of broker time: orders/s = N / T, refreshes
  and publishing included (n/a when one refresh held the whole backlog);
  ``orders_per_s_all``: every order of the backlog over the same span from
  the first to the last update (comparable across worker counts, where
  each worker counts its own version); CPU per order: every worker
  process's CPU seconds during the drain;
* restart: the worker is stopped (it writes its checkpoint) and started
  again, with the catalog only and with the whole history: seconds until
  Faust is ready, and the scoring process's checkpoint read;
* latency: the orders replayed again (new ids) at a fixed rate; for every
  ``bundle-updates`` message, its produce time − the produce time of the
  newest event that caused it; p50/p99.

With ``2`` workers (the 10× backlog, row ``workers: 2``) the same drain and
latency, no restarts: two workers share the four tasks.

The bench reads ``bundle-updates`` only once the worker has gone quiet
(:func:`settle`), so it does not compete with the worker for the cores.

Writes ``bench/results/streaming.json`` and ``streaming.md``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graph.events import ItemUpserted, Order  # noqa: E402
from streaming.broker import EmbeddedBroker  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.settings import Topics  # noqa: E402
from tests.kafka_helpers import (Reader, WorkerProcess, children, cpu_seconds, settle, stream_env,  # noqa: E402
                                 topic)

sys.path.insert(0, str(ROOT / "bench"))
from scale import machine, table  # noqa: E402
from training.datasets import in_time_order, read_events  # noqa: E402

SCALES = [int(x) for x in sys.argv[1:]] or [1, 10]
TWO_WORKERS = 10  # the scale the two-worker row drains
DATA = ROOT.parent / "shared" / "data" / "online_retail_ii" / "online_retail_ii.csv.gz"


def scaled(orders: list[Order], times: int, tag: str, first: int = 0) -> list[Order]:
    """``times`` copies of the orders with fresh ids, one after the other in time: copy k shifted by
    ``first + k`` times the data's span (the store refuses orders dated more than a day ahead of its clock, and
    orders dated before its window)."""
    span = orders[-1].ts - orders[0].ts
    out = []
    for k in range(times):
        for o in orders:
            out.append(o.model_copy(update={"order_id": f"{o.order_id}-{tag}{k}", "ts": o.ts + (first + k) * span,
                                            "user_id": f"{o.user_id}-{tag}{k}" if o.user_id else None}))
    return out


def worker_cpu(pid: int) -> float:
    """CPU seconds so far of the worker's process and its children (the scoring process)."""
    return sum(cpu_seconds(p) for p in [pid, *children(pid)])


def restart(worker: WorkerProcess) -> tuple[float, float]:
    """Stop the worker (it writes its checkpoints), start it again: seconds until Faust is ready, and the
    seconds its scoring process took to read its tasks' checkpoints (from its log)."""
    assert worker.stop() == 0
    started = time.perf_counter()
    worker.start()
    ready = time.perf_counter() - started
    tasks = int(worker.env["BUNDLEGNN_STREAM__PARTITIONS"])  # one checkpoint per task, read in turn
    lines = [ln for ln in worker.output().splitlines() if "from its checkpoint (read in" in ln][-tasks:]
    return ready, sum(float(line.split("(read in ")[1].split(" s)")[0]) for line in lines)


def run(scale: int, catalog: list[ItemUpserted], orders: list[Order], bootstrap: str, workdir: Path,
        rate: float, workers: int = 1) -> dict[str, object]:
    state = workdir / f"state{scale}-{workers}"
    env = stream_env(bootstrap, state)
    env["BUNDLEGNN_STREAM__ENCODE_TEXT"] = "false"
    env["BUNDLEGNN_STREAM__PARTITIONS"] = "4"
    topics = Topics(**{k: topic(env, k) for k in Topics.model_fields})
    others = [WorkerProcess(env, workdir / f"worker{scale}-{n}.log", "--model", "none") for n in range(1, workers)]
    worker = WorkerProcess(env, workdir / f"worker{scale}.log", "--model", "none").start()
    for other in others:
        other.start()
    updates = Reader(bootstrap, topics.bundle_updates)
    producer = EventProducer(bootstrap, topics)
    try:
        for item in catalog:
            producer.send(item)
        producer.flush()
        last_item = catalog[-1].item_id.encode()
        updates.wait_for(lambda r: r.key == last_item, timeout=120)
        first_restart = restart(worker) if not others else (None, None)  # history: the catalog only

        # throughput: a backlog produced while the workers are stopped, drained by the restarted workers
        assert all(w.stop() == 0 for w in [worker, *others])
        batch = scaled(orders, scale, "t", first=1 - scale)  # ends where the data ends
        produced = time.time() - 0.002  # record timestamps (whole ms) of the backlog are at least this
        once = Counter(o.order_id for o in batch)  # a stray cancellation or a repeated order id changes nothing
        last_placed = max(k for k, o in enumerate(batch) if o.status == "placed" and once[o.order_id] == 1)
        for k, o in enumerate(batch):
            if k == last_placed:
                sent_last = time.time() - 0.002  # its record timestamp (whole ms) is at least this
            producer.send(o)
        producer.flush()
        idle_cpu, pids, before = 0.0, [], updates.end()
        for w in [worker, *others]:  # all at once: one started after another would find the backlog drained
            w.launch()
        for w in [worker, *others]:  # each one's CPU from when it is ready (the first may start before the others)
            w.wait_ready()
            assert w.process is not None
            pids.append(w.process.pid)
            idle_cpu += worker_cpu(w.process.pid)  # started, checkpoints loaded, nothing applied yet (about)
        settle(updates, start=before)  # (the first may have drained much before the others were ready)
        drain_cpu = sum(map(worker_cpu, pids)) - idle_cpu
        newest = max((json.loads(r.value)["source_ts"] or 0) for r in updates.records)
        assert newest >= sent_last, f"drain incomplete: newest source time {newest}, last order sent at {sent_last}"
        seen = [(r.timestamp / 1000, u["graph_version"]) for r in updates.records
                if (u := json.loads(r.value))["source_ts"] is not None and u["source_ts"] >= produced]
        first, last = min(seen), max(seen, key=lambda s: (s[1], s[0]))
        drained, elapsed = last[1] - first[1], last[0] - first[0]
        span_all = max(t for t, _ in seen) - first[0]

        # restart with the whole history: it reads the checkpoints, not the history
        ready_s, load_s = restart(worker) if not others else (None, None)
        size = sum(f.stat().st_size for f in (state / "checkpoint").rglob("*") if f.is_file())

        # latency at a fixed rate
        paced = scaled(orders, 1, "l", first=1)[: int(rate * 20)]  # after the backlog, inside its window
        mark = len(updates.records)
        t0 = time.time()
        for n, o in enumerate(paced):
            ahead = n / rate - (time.time() - t0)
            if ahead > 0:
                time.sleep(ahead)
            producer.send(o)
        producer.flush()
        settle(updates)
        lat = [r.timestamp / 1000 - json.loads(r.value)["source_ts"] for r in updates.records[mark:]
               if json.loads(r.value)["source_ts"]]
    finally:
        producer.close()
        updates.close()
        for w in [worker, *others]:
            if w.process is not None:
                w.stop()
    rounded = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {
        "scale": scale, "workers": workers, "orders": len(batch), "throughput_orders_timed": drained,
        "throughput_s": round(elapsed, 2),
        "orders_per_s": round(drained / elapsed) if drained and elapsed > 0 and not others else None,  # None: one
        # refresh held all, or several workers (each its own version)
        "orders_per_s_all": round(len(batch) / span_all) if span_all > 0 else None,
        "cpu_ms_per_order": round(1000 * drain_cpu / len(batch), 3),
        "latency_rate_orders_per_s": rate, "latency_updates": len(lat),
        "latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else None,
        "latency_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat else None,
        "checkpoint_mb": round(size / 1e6, 2), "restart_ready_s_catalog_only": rounded(first_restart[0]),
        "restart_ready_s": rounded(ready_s), "checkpoint_load_s": rounded(load_s),
    }


def markdown(report: dict) -> list[str]:
    """The report as markdown lines."""
    m, rows = report["machine"], report["runs"]
    cols = ["scale", "workers", "orders", "orders_per_s_all", "cpu_ms_per_order", "latency_p50_ms", "latency_p99_ms",
            "checkpoint_mb", "restart_ready_s_catalog_only", "restart_ready_s", "checkpoint_load_s"]
    lines = ["# Stream workers: throughput, latency, checkpoints and restarts", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}. "
             "`python bench/worker_throughput.py` (embedded tansu broker on the same cores).", ""]
    lines += table(cols, rows)
    lines += ["", "orders_per_s_all: a backlog of K copies of Online Retail II (European subset) drained by the "
              "workers without a model, every order of it over the span from the first to the last bundle update "
              "that reflects it (the JSON's orders_per_s counts graph versions, which the repartition's records "
              "raise too); cpu_ms_per_order: CPU of every worker process during the drain per order; latency: "
              "produce time of an order to the bundle update it caused, orders sent at 200/s; restart_ready_s: stop "
              "(checkpoints) to Faust ready again with the whole history, against the catalog only; "
              "checkpoint_load_s: the scoring process reading its tasks' checkpoints.", "",
              f"Two workers' CPU per order / one worker's ({TWO_WORKERS}×, same run): "
              f"{report['two_workers_cpu_per_order_ratio']}.", ""]
    return lines


def main() -> int:
    events = in_time_order(read_events(DATA))
    catalog = [e for e in events if isinstance(e, ItemUpserted)]
    orders = [e for e in events if isinstance(e, Order)]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "streaming-logs"  # worker logs of this run, for the profile of a slow result
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    with EmbeddedBroker() as broker:
        rows = [run(scale, catalog, orders, broker.bootstrap, logs, rate=200.0) for scale in SCALES]
        if TWO_WORKERS in SCALES:
            rows.append(run(TWO_WORKERS, catalog, orders, broker.bootstrap, logs, rate=200.0, workers=2))
    one = next((r for r in rows if r["scale"] == TWO_WORKERS and r["workers"] == 1), None)
    two = next((r for r in rows if r["workers"] == 2), None)
    cpu_ratio = round(two["cpu_ms_per_order"] / one["cpu_ms_per_order"], 3) if one and two else None
    report = {"machine": machine(), "runs": rows, "two_workers_cpu_per_order_ratio": cpu_ratio}
    (out / "streaming.json").write_text(json.dumps(report, indent=2))
    lines = markdown(report)
    (out / "streaming.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
