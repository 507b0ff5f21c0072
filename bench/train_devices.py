"""`make bench`: the same training job on CPU and, where CUDA exists, on the GPU (fp32 and bf16 heads).

Each run trains ``--epochs`` epochs of the configured model on the dataset's
orders (no early stopping, so every run does the same work) and reports
seconds per epoch; the GPU rows quote their speed-up over the CPU row of the
same run. The GPU part runs only where ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bundlegnn.config import load_settings
from graph.store import GraphStore
from training.datasets import in_time_order, read_events
from training.encoder import TextEncoder
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def run(store: GraphStore, text, cfg, device: str, precision: str) -> dict[str, object]:
    c = cfg.model_copy(update={"device": device, "precision": precision, "patience": cfg.epochs})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = train(store, text, c, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"device": device, "precision": precision, "epochs": len(result.history), "seconds": round(seconds, 2),
            "s_per_epoch": round(seconds / len(result.history), 3), "final_loss": round(result.history[-1]["loss"], 4)}


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
        rows += [run(store, text, cfg, "cuda", p) for p in ("fp32", "bf16")]
    for row in rows:
        row["speedup_vs_cpu"] = round(rows[0]["s_per_epoch"] / row["s_per_epoch"], 2)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"dataset": str(data), "items": store.num_items, "users": store.num_users,
              "co_purchase_edges": store.num_co_edges(), "threads": torch.get_num_threads(), "gpu": gpu, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_devices.json").write_text(json.dumps(report, indent=2))
    lines = [f"Training, {args.epochs} epochs on {Path(data).parent.name} ({store.num_items} items, "
             f"{store.num_co_edges()} co-purchase pairs); GPU: {gpu or 'none on this machine'}", "",
             "| device | precision | s/epoch | speed-up vs CPU | final loss |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['device']} | {r['precision']} | {r['s_per_epoch']} | {r['speedup_vs_cpu']}× | {r['final_loss']} |"
              for r in rows]
    (args.out / "train_devices.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
