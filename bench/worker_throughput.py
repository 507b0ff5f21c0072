"""`make bench`, streaming part: order events/s through one worker and event→update latency.

Starts the embedded broker and one ``bundlegnn worker`` (no model, no text
encoding: the stream path alone), loads the catalog, then for 1× and 10× the
real data (the 10× copy repeats every order with new order and user ids,
shifted in time by the data's span, so basket sizes and item popularity keep
their statistics):

* throughput: the worker is stopped, all orders are produced into the
  topic (a backlog, so the producer's speed does not count), the worker is
  started again and drains it. Between the first bundle update that
  reflects an order and the last one, ``graph_version`` (one per applied
  order) rose by N in T seconds of broker time: orders/s = N / T, refreshes
  and publishing included (n/a when one refresh held the whole backlog).
  The whole-drain figure counts from the rebuilt graph's lists, published
  as consumption starts, so it includes the consumer's start;
* latency: the orders replayed again (new ids) at a fixed rate; for every
  ``bundle-updates`` message, its produce time − the produce time of the
  newest event that caused it; p50/p99.

The bench reads ``bundle-updates`` only once the worker has gone quiet
(:func:`settle`), so it does not compete with the worker for the cores.

Writes ``bench/results/streaming.json`` and ``streaming.md``.
"""

from __future__ import annotations

import json
import sys
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graph.events import ItemUpserted, Order  # noqa: E402
from streaming.broker import EmbeddedBroker  # noqa: E402
from streaming.producer import EventProducer  # noqa: E402
from streaming.settings import Topics  # noqa: E402
from tests.kafka_helpers import Reader, WorkerProcess, settle, stream_env, topic  # noqa: E402
from training.datasets import in_time_order, read_events  # noqa: E402

SCALES = [int(x) for x in sys.argv[1:]] or [1, 10]
DATA = ROOT.parent / "shared" / "data" / "online_retail_ii" / "online_retail_ii.csv.gz"


def scaled(orders: list[Order], times: int, tag: str) -> list[Order]:
    """``times`` copies of the orders with fresh ids, each shifted by the data's span."""
    span = orders[-1].ts - orders[0].ts
    out = []
    for k in range(times):
        for o in orders:
            out.append(o.model_copy(update={"order_id": f"{o.order_id}-{tag}{k}", "ts": o.ts + k * span,
                                            "user_id": f"{o.user_id}-{tag}{k}" if o.user_id else None}))
    return out


def run(scale: int, catalog: list[ItemUpserted], orders: list[Order], bootstrap: str, workdir: Path,
        rate: float, batched: bool) -> dict[str, object]:
    env = stream_env(bootstrap, workdir / f"state{scale}{batched}")
    env["BUNDLEGNN_STREAM__ENCODE_TEXT"] = "false"
    if batched:  # Kafka's default batching; on tansu this breaks changelog recovery (see StreamConfig)
        del env["BUNDLEGNN_STREAM__PRODUCER_MAX_BATCH_SIZE"]
    env["BUNDLEGNN_STREAM__PARTITIONS"] = "4"
    topics = Topics(**{k: topic(env, k) for k in Topics.model_fields})
    worker = WorkerProcess(env, workdir / f"worker{scale}{'-batched' if batched else ''}.log", "--model", "none").start()
    updates = Reader(bootstrap, topics.bundle_updates)
    producer = EventProducer(bootstrap, topics)
    try:
        for item in catalog:
            producer.send(item)
        producer.flush()
        last_item = catalog[-1].item_id.encode()
        updates.wait_for(lambda r: r.key == last_item, timeout=120)

        # throughput: a backlog produced while the worker is stopped, drained by the restarted worker
        assert worker.stop() == 0
        batch = scaled(orders, scale, "t")
        for o in batch[:-1]:
            producer.send(o)
        sent_last = time.time() - 0.002  # the last order's record timestamp (whole ms) is at least this
        producer.send(batch[-1])
        producer.flush()
        restarted = time.time()
        worker.start()
        settle(updates)
        assert any((json.loads(r.value)["source_ts"] or 0) >= sent_last for r in updates.records), "drain incomplete"
        # (broker time, graph version, caused by an order?); the restart's rebuild publishes without a source time
        seen = [(r.timestamp / 1000, u["graph_version"], u["source_ts"] is not None)
                for r in updates.records if r.timestamp / 1000 >= restarted for u in [json.loads(r.value)]]
        first = min(s for s in seen if s[2])
        last = max(seen, key=lambda s: (s[1], s[0]))
        drained, elapsed = last[1] - first[1], last[0] - first[0]
        rebuilt = min(s for s in seen if not s[2])  # the rebuilt graph's lists: published as consumption starts
        whole, whole_s = last[1] - rebuilt[1], last[0] - rebuilt[0]

        # latency at a fixed rate
        paced = scaled(orders, max(1, scale // 5), "l")[: int(rate * 20)]
        mark = len(updates.records)
        t0 = time.time()
        for n, o in enumerate(paced):
            ahead = n / rate - (time.time() - t0)
            if ahead > 0:
                time.sleep(ahead)
            producer.send(o)
        producer.flush()
        settle(updates)
        print(f"scale {scale}: {len(updates.records)} updates, {len(updates.records) - mark} in the paced phase",
              file=sys.stderr)
        lat = [r.timestamp / 1000 - json.loads(r.value)["source_ts"] for r in updates.records[mark:]
               if json.loads(r.value)["source_ts"]]
    finally:
        producer.close()
        updates.close()
        worker.stop()
    return {
        "changelog_batching": "kafka default" if batched else "one record per batch (tansu-safe)",
        "scale": scale, "orders": len(batch), "throughput_orders_timed": drained, "throughput_s": round(elapsed, 2),
        "orders_per_s": round(drained / elapsed) if drained and elapsed > 0 else None,  # None: one refresh held all
        "whole_drain_orders": whole, "whole_drain_s": round(whole_s, 2),
        "whole_drain_orders_per_s": round(whole / whole_s), "latency_rate_orders_per_s": rate,
        "latency_updates": len(lat),
        "latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else None,
        "latency_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat else None,
    }


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
        rows = [run(scale, catalog, orders, broker.bootstrap, logs, rate=200.0, batched=batched)
                for scale in SCALES for batched in (False, True)]
    (out / "streaming.json").write_text(json.dumps({"runs": rows}, indent=2))
    lines = ["| scale | changelog batching | orders | orders/s (one worker) | orders/s, whole drain | latency p50 | "
             "latency p99 (at 200 orders/s) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scale']}× | {r['changelog_batching']} | {r['orders']} | {r['orders_per_s'] or 'n/a'} | "
              f"{r['whole_drain_orders_per_s']} | {r['latency_p50_ms']} ms | {r['latency_p99_ms']} ms |" for r in rows]
    (out / "streaming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
