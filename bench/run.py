"""`make bench`: measured numbers, written to bench/results/ as JSON and a markdown table.

Graph replay: events/s and orders/s through ``GraphStore.apply`` on the real
files, and the snapshot save/load time. Ratios are quoted against the small
subset measured in the same run, since these machines are noisy.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from graph.snapshot import load, save
from graph.store import GraphConfig, GraphStore
from training.datasets import ImportReport, in_time_order, read_events

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {
    "online_retail_ii": SHARED / "online_retail_ii" / "online_retail_ii.csv.gz",
    "online_retail_ii_full": SHARED / "online_retail_ii_full" / "online_retail_ii.csv.gz",
}


def bench_replay(name: str, path: Path) -> dict[str, object]:
    report = ImportReport()
    started = time.perf_counter()
    events = in_time_order(read_events(path, report))
    parsed = time.perf_counter()
    store = GraphStore(GraphConfig())
    store.apply_all(events)
    applied = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save(store, Path(tmp) / "g")
        saved = time.perf_counter()
        load(Path(tmp) / "g").num_co_edges()
        loaded = time.perf_counter()
    orders = report.orders_placed + report.orders_cancelled
    return {
        "dataset": name,
        "events": len(events),
        "orders": orders,
        "items": store.num_items,
        "co_purchase_edges": store.num_co_edges(),
        "parse_s": round(parsed - started, 2),
        "apply_s": round(applied - parsed, 2),
        "events_per_s": round(len(events) / (applied - parsed)),
        "orders_per_s": round(orders / (applied - parsed)),
        "snapshot_save_s": round(saved - applied, 2),
        "snapshot_load_s": round(loaded - saved, 2),
    }


def main() -> int:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows = [bench_replay(name, path) for name, path in DATASETS.items() if path.exists()]
    if not rows:
        print(f"no datasets under {SHARED}", file=sys.stderr)
        return 1
    base = rows[0]["orders_per_s"]
    for row in rows:
        row["orders_per_s_vs_small"] = round(row["orders_per_s"] / base, 2)
    (out / "graph_replay.json").write_text(json.dumps(rows, indent=2))
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "graph_replay.md").write_text("# Graph replay\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
