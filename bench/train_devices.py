"""`make bench`: the same training job on CPU and, where CUDA exists, on the GPU (fp32 and bf16 heads).

Each run trains ``--epochs`` epochs of the configured model on the dataset's
orders (no early stopping, so every run does the same work) and reports
seconds per epoch (and on the GPU its peak allocation); the GPU rows quote their
speed-up over the CPU row of the same run. The GPU part runs only where
``torch.cuda.is_available()``; such a run writes ``train_devices_cuda.{json,md}``,
a CPU-only one ``train_devices_cpu.{json,md}``, so neither replaces the other.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bundlegnn.config import load_settings
from bundlegnn.provenance import describe, machine
from graph.store import GraphStore
from training.datasets import in_time_order, read_events
from training.encoder import TextEncoder
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def run(store: GraphStore, text, cfg, device: str, precision: str) -> dict[str, object]:
    c = cfg.model_copy(update={"device": device, "precision": precision, "patience": cfg.epochs})
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(store, text, c, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"device": device, "precision": precision, "epochs": len(result.history), "seconds": round(seconds, 2),
            "s_per_epoch": round(seconds / len(result.history), 3), "final_loss": round(result.history[-1]["loss"], 4),
            "gnn_epochs_s": round(result.phases["gnn_epochs_s"], 2), "gnn_steps": result.gnn_steps,
            "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "online_retail_ii.yaml")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: data.path of the config)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    settings = load_settings(args.config)
    data = args.data or settings.data.path
    store = GraphStore(settings.graph)
    store.apply_all(in_time_order(read_events(data)))
    encoder = TextEncoder(settings.encoder.model_dir, settings.paths.text_cache, settings.encoder.batch_size,
                          settings.encoder.max_length)
    text = encoder.encode([it.text for it in store.catalog], progress=False)
    cfg = settings.training.model_copy(update={"epochs": args.epochs})
    rows = [run(store, text, cfg, "cpu", "fp32")]
    if torch.cuda.is_available():
        run(store, text, cfg.model_copy(update={"epochs": 1}), "cuda", "fp32")  # untimed: CUDA's start-up
        rows += [run(store, text, cfg, "cuda", p) for p in ("fp32", "bf16")]
    for row in rows:
        row["speedup_vs_cpu"] = round(rows[0]["s_per_epoch"] / row["s_per_epoch"], 2)
        row["gnn_speedup_vs_cpu"] = round(rows[0]["gnn_epochs_s"] / row["gnn_epochs_s"], 2)
    where = machine()
    gpu = None if where["gpu"] == "no GPU" else where["gpu"]
    report = {"machine": where, "dataset": str(data), "items": store.num_items, "users": store.num_users,
              "co_purchase_edges": store.num_co_edges(), "threads": torch.get_num_threads(), "gpu": gpu, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_devices_cuda" if gpu else "train_devices_cpu"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Training on each device: {args.epochs} epochs on {Path(data).parent.name}", "",
             f"{describe(report['machine'])}; {torch.get_num_threads()} CPU threads. `python bench/train_devices.py"
             f"{f' --data {args.data}' if args.data else ''} --epochs {args.epochs}`: {store.num_items} items, "
             f"{store.num_co_edges()} co-purchase pairs, the whole "
             "`train` (graph, GNN epochs with no early stopping, validation, decoder).", "",
             "| device | precision | s/epoch (all of train) | speed-up vs CPU | GNN epochs s | GNN speed-up | steps | "
             "GPU peak GB | final loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['device']} | {r['precision']} | {r['s_per_epoch']} | {r['speedup_vs_cpu']}× | {r['gnn_epochs_s']} | "
              f"{r['gnn_speedup_vs_cpu']}× | {r['gnn_steps']} | {'' if r['gpu_peak_gb'] is None else r['gpu_peak_gb']} | "
              f"{r['final_loss']} |" for r in rows]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
