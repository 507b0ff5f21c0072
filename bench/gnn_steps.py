"""`make bench` (GNN steps): full-graph against sampled training steps as the shop grows.

For each shop (K time-ordered copies of Online Retail II full, as in ``bench/model_scale.py``) and each kind
of step (``training.gnn_steps``: full, sampled), a child process splits the shop, encodes its text, and trains
the GNN alone (no decoder) for ``--epochs`` epochs with the shipped settings on ``--device`` (default: CUDA
where it exists). It reports seconds per epoch (wall, and processor seconds of both cores, which other jobs on
the machine change less), the memory the epochs took above what the process held once training had built its
graph (the kernel's resident high-water mark, reset through ``/proc/self/clear_refs`` then; on CUDA also the
device's peak allocation above it; no early stopping in the epochs), the validation NDCG@10
of the GNN's own head after the last epoch (on the early-stopping sample), and
:func:`training.train.full_step_gb`'s estimate (which picks the kind under ``auto``).
Writes ``bench/results/gnn_steps.{json,md}``, on CUDA ``gnn_steps_cuda.{json,md}`` (their machines differ);
the recorded rows of the shops and kinds this run does not repeat stay (each row names its commit).
Usage: ``python bench/gnn_steps.py [--scales 1,10,40] [--epochs 3] [--kinds full,sampled] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from scale import OUT, WORK, machine, table, write_copies  # noqa: E402

KINDS = ["full", "sampled"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(data: Path, kind: str, epochs: int, device: str) -> dict:
    """Split, encode and train the GNN alone with ``kind`` steps on ``device`` in this process; the measurements."""
    import torch

    from bundlegnn.cli import _read, _settings
    from training import train as training
    from training.protocol import rank_queries, time_split

    settings = _settings(None)
    events, _ = _read(settings, data)
    cfg = settings.training.model_copy(update={"gnn_steps": kind, "epochs": epochs, "gnn_budget_s": None,
                                               "decoder": False, "device": device})
    cuda = device.startswith("cuda")
    split = time_split(events, settings.graph, seed=cfg.seed, test_frac=0.0, with_train=False)
    text = settings.encoder.build(settings.paths.text_cache).encode([it.text for it in split.fit.catalog])
    built: list = []
    build = training.Graph.build

    def measured_build(*args, **kwargs):  # the epochs' memory starts once train has built its graph
        graph = build(*args, **kwargs)
        if cuda:  # the device's peak restarts from what the graph holds
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
            rss_kb = _status_kb("VmRSS")
        except OSError as e:  # some sandboxes refuse it: the high-water mark then says nothing about the steps
            print(f"no step_gb: /proc/self/clear_refs: {e}", file=sys.stderr)
            rss_kb = None
        built.append((graph, rss_kb, time.process_time(), torch.cuda.memory_allocated() if cuda else 0))
        return graph

    training.Graph.build = measured_build
    result = training.train(split.fit, text, cfg, progress=False)  # no early stopping: the epochs alone
    cpu_s = time.process_time() - built[0][2]
    step_gb = None if built[0][1] is None else round((_status_kb("VmHWM") - built[0][1]) / 1e6, 2)
    gpu_step_gb = round((torch.cuda.max_memory_allocated() - built[0][3]) / 1e9, 2) if cuda else None
    training.Graph.build = build
    assert result.gnn_steps == kind, (result.gnn_steps, kind)
    graph, n = built[0][0], split.fit.num_items
    val = training.sample(split.val, cfg.early_stop_queries, [cfg.seed, 2])
    ndcg = rank_queries(training.head_scores(result.model, graph), val, n).metrics(n)["ndcg@10"]
    return {"items": n, "users": split.fit.num_users, "nodes": graph.num_items + graph.num_users,
            "edges": sum(int(index.size(1)) for index in graph.edge_index.values()), "kind": kind,
            **({"gpu_step_gb": gpu_step_gb} if cuda else {}),
            "channels": cfg.hidden * cfg.layers, "epochs": len(result.history),
            "s_per_epoch": round(result.phases["gnn_epochs_s"] / len(result.history), 1),
            "cpu_s_per_epoch": round(cpu_s / len(result.history), 1), "step_gb": step_gb,
            "full_step_estimate_gb": round(training.full_step_gb(graph, cfg), 2), "val_ndcg@10": round(ndcg, 4)}


def markdown(report: dict) -> str:
    m = report["machine"]
    gpu = any("gpu_step_gb" in r for r in report["rows"])
    cols = ["shop", "commit", "kind", "items", "users", "nodes", "edges", "epochs", "s_per_epoch", "cpu_s_per_epoch",
            "step_gb", *(["gpu_step_gb"] if gpu else []), "full_step_estimate_gb", "val_ndcg@10"]
    lines = ["# GNN steps: full-graph against sampled", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}"
             f"{', ' + m['gpu'] if gpu else ''}. `python bench/gnn_steps.py{' --device cuda' if gpu else ''}` "
             f"({report['epochs']} epochs each, no time budget, no decoder).", ""]
    lines += table(cols, report["rows"])
    full = [r for r in report["rows"] if r["kind"] == "full" and r["step_gb"] is not None and not gpu]
    if len(full) >= 2:  # the constants of the estimate, fitted to these full-graph steps
        a = np.array([[r["nodes"] * r["channels"], r["edges"]] for r in full], float)
        (per_node, per_edge), *_ = np.linalg.lstsq(a, np.array([r["step_gb"] * 1e9 for r in full]), rcond=None)
        lines += ["", f"Least squares over the full-graph rows: step_gb ≈ {per_node:.0f} B × nodes × hidden × "
                  f"layers + {per_edge:.0f} B × edges (`training.train` estimates with {report['constants'][0]:g} and "
                  f"{report['constants'][1]:g})."]
    lines += ["", "orii_K: K copies of Online Retail II full (time order), trained on the part before validation. "
              "step_gb: the resident high-water mark during the epochs above the RSS before them (the steps' "
              "activations, and for sampled steps the drawing tables and subgraphs)."
              + (" gpu_step_gb: the GPU's peak allocation during the epochs above what the built graph held." if gpu
                 else "") + " full_step_estimate_gb: what "
              "`training.gnn_steps: auto` compares with `training.gnn_memory_gb` (default a quarter of RAM). "
              "val_ndcg@10: the GNN's own head after the last epoch on the early-stopping sample of the validation "
              "queries.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,10,40")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS), help="kinds of step to run; the recorded rows of the "
                        "others (and of other shops) are kept")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA where it exists)")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "KIND"))
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.epochs, args.device)))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BUNDLEGNN_PATHS__STATE_DIR": str(WORK / "gnn-steps")}
    kinds = [k for k in args.kinds.split(",") if k]
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: each of {KINDS}, got {args.kinds!r}")
    scales = [int(s) for s in args.scales.split(",") if s]
    kept = []
    name = "gnn_steps" if args.device == "cpu" else "gnn_steps_cuda"
    if (OUT / f"{name}.json").exists():  # the rows this run does not repeat
        recorded = json.loads((OUT / f"{name}.json").read_text())
        rerun = {(f"orii_{k}", kind) for k in scales for kind in kinds}
        kept = [r for r in recorded["rows"] if (r["shop"], r["kind"]) not in rerun]
        if kept and recorded["epochs"] != args.epochs:
            parser.error(f"the recorded rows ran {recorded['epochs']} epochs, not --epochs {args.epochs}")
    rows = []
    for k in scales:
        data = WORK / f"orii_{k}_sorted.csv"
        write_copies(k, data, in_time_order=True)
        try:
            for kind in kinds:
                done = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--device", args.device,
                                       "--child", str(data), kind], cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"orii_{k} {kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")
                row = {"shop": f"orii_{k}", "commit": machine()["commit"], **json.loads(done.stdout.splitlines()[-1])}
                print(f"  {row}", flush=True)
                rows.append(row)
        finally:
            data.unlink(missing_ok=True)
    from training.train import STEP_BYTES_PER_EDGE, STEP_BYTES_PER_NODE_CHANNEL

    rows = sorted(kept + rows, key=lambda r: (int(r["shop"].split("_")[1]), KINDS.index(r["kind"])))
    report = {"machine": machine(), "epochs": args.epochs, "rows": rows,
              "constants": [STEP_BYTES_PER_NODE_CHANNEL, STEP_BYTES_PER_EDGE]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))
    (OUT / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
