"""`make bench` (model scale): `bundlegnn train` as the shop grows — seconds and peak RSS per phase.

Shops: K copies of Online Retail II full (the scale-ups of ``bench/scale.py``, written in time order) at
1×, 4× and 10×, and The Complete Journey. Each is trained by ``bundlegnn train`` in a subprocess under
``/usr/bin/time -v``; its summary gives each phase's seconds and the peak RSS so far when the phase ended
(split and stores, text encoding, graph, GNN epochs, decoder tuning, user weight, the lists the bundle
builder's pair model is fitted on, the final decoder and artifact). Writes
``bench/results/model_scale.{json,md}``. Usage: ``python bench/model_scale.py [--scales 1,4,10] [--no-cj]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from scale import CJ_CONFIG, OUT, WORK, _time_v, machine, table, write_copies  # noqa: E402

PHASES = ["split", "encode", "graph", "gnn_epochs", "decoder_tuning", "user_weight", "validation_lists", "final_decoder"]


def train(name: str, args: list[str], env: dict[str, str]) -> dict:
    state = WORK / f"model-{name}"
    shutil.rmtree(state, ignore_errors=True)
    run_env = {**env, "BUNDLEGNN_PATHS__STATE_DIR": str(state), "BUNDLEGNN_PATHS__MODEL_STORE": str(state / "models")}
    done, wall, rss = _time_v([sys.executable, "-m", "bundlegnn.cli", "train", *args], run_env)
    summary = json.loads(done.stdout[done.stdout.index("{\n"):])
    phases = summary["phases"]
    row = {"shop": name, "commit": machine()["commit"], "items": summary["items"], "train_s": round(wall, 1), "peak_rss_gb": round(rss, 2),
           "decoder": (summary.get("decoder") or {}).get("method"), "gnn_weight": summary.get("gnn_weight"),
           "user_weight": summary.get("user_weight"), "head_weight": summary.get("head_weight"),
           "epochs": phases.get("gnn_epochs_epochs"),
           "s_per_epoch": round(phases["gnn_epochs_s"] / max(1, phases.get("gnn_epochs_epochs", 1)), 1),
           "decoder_fits": phases.get("decoder_tuning_fits")}
    for phase in PHASES:
        row[f"{phase}_s"] = phases.get(f"{phase}_s")
        row[f"{phase}_rss_gb"] = phases.get(f"{phase}_peak_rss_gb")
    shutil.rmtree(state, ignore_errors=True)
    print(f"  {name}: {row}", flush=True)
    return row


def markdown(report: dict) -> str:
    m = report["machine"]
    cols = ["shop", "commit", "items", "train_s", "peak_rss_gb", "decoder", "gnn_weight", "user_weight", "head_weight",
            "epochs", "s_per_epoch", "decoder_fits"] + [f"{p}_s" for p in PHASES]
    lines = ["# Model scale: `bundlegnn train` per shop", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}. "
             "`python bench/model_scale.py`.", ""]
    lines += table(cols, report["shops"])
    lines += ["", "Peak RSS (GB) when each phase ended:", ""]
    lines += table(["shop"] + [f"{p}_rss_gb" for p in PHASES], report["shops"])
    lines += ["", "orii_K: K copies of Online Retail II full (time order); cj: The Complete Journey. train_s and "
              "peak_rss_gb: `/usr/bin/time -v` of `bundlegnn train`; phases from its summary.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,4,10")
    parser.add_argument("--no-cj", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows = []
    for k in [int(s) for s in args.scales.split(",") if s]:
        data = WORK / f"orii_{k}_sorted.csv"
        started = time.perf_counter()
        written = write_copies(k, data, in_time_order=True)
        print(f"orii_{k}: wrote {written['rows']:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        try:
            rows.append(train(f"orii_{k}", ["--data", str(data)], env))
        finally:
            data.unlink(missing_ok=True)
    if not args.no_cj:
        rows.append(train("cj", ["--config", str(CJ_CONFIG)], env))
    path = OUT / "model_scale.json"
    if path.exists():  # a run of some shops keeps the others' rows (each row names its commit)
        done = {r["shop"] for r in rows}
        rows = [r for r in json.loads(path.read_text())["shops"] if r["shop"] not in done] + rows
    report = {"machine": machine(), "shops": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "model_scale.json").write_text(json.dumps(report, indent=2))
    (OUT / "model_scale.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
