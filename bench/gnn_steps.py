"""`make bench` (GNN steps): full-graph against sampled training steps as the shop grows.

For each shop (K time-ordered copies of Online Retail II full, as in ``bench/model_scale.py``) and each kind
of step (``training.gnn_steps``: full, sampled), a child process splits the shop, encodes its text, and trains
the GNN alone (no decoder) for ``--epochs`` epochs with the shipped settings. It reports seconds per epoch,
the memory the epochs took above what the process held before training (the kernel's resident high-water
mark, reset through ``/proc/self/clear_refs`` just before training; no early stopping in the epochs), the
validation NDCG@10 of the GNN's own head after the last epoch (on the early-stopping sample), and :func:`training.train.full_step_gb`'s estimate (which picks the kind under
``auto``). Writes ``bench/results/gnn_steps.{json,md}``.
Usage: ``python bench/gnn_steps.py [--scales 1,10,40] [--epochs 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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


def child(data: Path, kind: str, epochs: int) -> dict:
    """Split, encode and train the GNN alone with ``kind`` steps in this process; the measurements."""
    from bundlegnn.cli import _read, _settings
    from training.protocol import rank_queries, time_split
    from training.train import Graph, full_step_gb, head_scores, sample, select_device, train

    settings = _settings(None)
    events, _ = _read(settings, data)
    cfg = settings.training.model_copy(update={"gnn_steps": kind, "epochs": epochs, "gnn_budget_s": None,
                                               "decoder": False})
    split = time_split(events, settings.graph, seed=cfg.seed, test_frac=0.0, with_train=False)
    text = settings.encoder.build(settings.paths.text_cache).encode([it.text for it in split.fit.catalog])
    graph = Graph.build(split.fit, text, select_device(cfg.device), co_per_item=cfg.co_edges_per_item,
                        ui_per_user=cfg.ui_edges_per_user)
    estimate = full_step_gb(graph, cfg)
    edges = sum(int(index.size(1)) for index in graph.edge_index.values())
    before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    result = train(split.fit, text, cfg, progress=False)  # no early stopping: the epochs alone are measured
    step_gb = (_status_kb("VmHWM") - before_kb) / 1e6
    assert result.gnn_steps == kind, (result.gnn_steps, kind)
    n = split.fit.num_items
    val = sample(split.val, cfg.early_stop_queries, [cfg.seed, 2])
    return {"items": n, "users": split.fit.num_users, "edges": edges, "kind": kind, "epochs": len(result.history),
            "s_per_epoch": round(result.phases["gnn_epochs_s"] / len(result.history), 1),
            "step_gb": round(step_gb, 2), "full_step_estimate_gb": round(estimate, 2),
            "val_ndcg@10": round(rank_queries(head_scores(result.model, graph), val, n).metrics(n)["ndcg@10"], 4)}


def markdown(report: dict) -> str:
    m = report["machine"]
    cols = ["shop", "commit", "kind", "items", "users", "edges", "epochs", "s_per_epoch", "step_gb",
            "full_step_estimate_gb", "val_ndcg@10"]
    lines = ["# GNN steps: full-graph against sampled", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}. "
             f"`python bench/gnn_steps.py` ({report['epochs']} epochs each, no time budget, no decoder).", ""]
    lines += table(cols, report["rows"])
    lines += ["", "orii_K: K copies of Online Retail II full (time order), trained on the part before validation. "
              "step_gb: the resident high-water mark during the epochs above the RSS before them (the steps' "
              "activations and the graph's tensors). full_step_estimate_gb: what `training.gnn_steps: auto` "
              "compares with `training.gnn_memory_gb` (default a quarter of RAM). val_ndcg@10: the GNN's own "
              "head after the last epoch on the early-stopping sample of the validation queries.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,10,40")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("DATA", "KIND"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.epochs)))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BUNDLEGNN_PATHS__STATE_DIR": str(WORK / "gnn-steps")}
    rows = []
    for k in [int(s) for s in args.scales.split(",") if s]:
        data = WORK / f"orii_{k}_sorted.csv"
        write_copies(k, data, in_time_order=True)
        try:
            for kind in KINDS:
                done = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", str(data),
                                       kind], cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"orii_{k} {kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")
                row = {"shop": f"orii_{k}", "commit": machine()["commit"], **json.loads(done.stdout.splitlines()[-1])}
                print(f"  {row}", flush=True)
                rows.append(row)
        finally:
            data.unlink(missing_ok=True)
    report = {"machine": machine(), "epochs": args.epochs, "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gnn_steps.json").write_text(json.dumps(report, indent=2))
    (OUT / "gnn_steps.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
