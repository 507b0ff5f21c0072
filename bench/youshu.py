"""Youshu user → bundle (BGCN / CrossCBR split): the project's GNN and decoder beside the published numbers.

Writes bench/results/youshu.{json,md}. See :mod:`training.youshu` for how the benchmark maps onto the
pipeline. Usage: ``python bench/youshu.py [--data ../shared/data/youshu] [--seeds 0]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import OUT, machine  # noqa: E402

from training.train import Graph, TrainConfig, decoders_for, select_device, side_views, train  # noqa: E402
from training.youshu import Youshu, ranked_metrics  # noqa: E402
PUBLISHED = {"BGCN (SIGIR'20)": (0.2436, 0.1329), "MIDGN (AAAI'22)": (0.2682, 0.1527),
             "CrossCBR (KDD'22)": (0.2823, 0.1670), "BundleGT (SIGIR'23)": (0.2905, 0.1737)}
READ_WEIGHTS = (0.0, 0.0003, 0.001, 0.003)


def user_scores(decoder, y: Youshu, users: np.ndarray, read: sp.csr_matrix, weight: float) -> torch.Tensor:
    """Scores of every bundle for ``users``: the decoder over each user's training bundles plus ``weight`` × how
    many of each bundle's books the user read (:meth:`Youshu.read_books`)."""
    x = y.train[users]
    sizes = np.maximum(np.asarray(x.sum(1)).ravel(), 1)
    q = (sp.diags(1 / sizes) @ x).tocsr()
    out = decoder.scores(q).float() if decoder is not None else torch.zeros(len(users), y.num_bundles)
    return out + weight * torch.from_numpy(read[users].toarray())


def measure(decoder, y: Youshu, truth: sp.csr_matrix, read: sp.csr_matrix, weight: float) -> dict[str, float]:
    users = np.flatnonzero(np.asarray(truth.sum(1)).ravel() > 0)
    parts = [ranked_metrics(user_scores(decoder, y, users[a:a + 1024], read, weight), y.train[users[a:a + 1024]],
                            truth[users[a:a + 1024]]) for a in range(0, len(users), 1024)]
    n = sum(p["users"] for p in parts)
    return {m: sum(p[m] * p["users"] for p in parts) / n for m in ("recall", "ndcg")} | {"users": n}


def run(y: Youshu, seed: int, cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    store = y.store()
    feats = y.features(seed=seed)
    tune_q = y.queries(store, y.tune)
    result = train(store, feats, cfg.model_copy(update={"seed": seed}), val=tune_q)
    graph = Graph.build(store, feats, select_device(cfg.device), co_per_item=cfg.co_edges_per_item,
                        ui_per_user=cfg.ui_edges_per_user)
    without = max((d for d in result.decoder_val if d.gnn_weight == 0), key=result.decoder_val.get)
    fits = list(decoders_for([result.decoder, without], graph, side_views(result.model, graph)))
    read = y.read_books()
    methods, tuned = {}, {}
    for name, decoder in (("gnn", fits[0]), ("composition_ease", fits[1])):
        val = {w: measure(decoder, y, y.tune, read, w)["recall"] for w in READ_WEIGHTS}
        tuned[name] = {"decoder": decoder.config.model_dump(), "read_weight": max(val, key=val.get),
                       "tune_recall@20": val}
        methods[name] = measure(decoder, y, y.test, read, tuned[name]["read_weight"])
    methods["gnn_decoder_only"] = measure(fits[0], y, y.test, read, 0.0)
    methods["read_books_only"] = measure(None, y, y.test, read, 1.0)
    popularity = DecoderPopularity(np.asarray(y.train.sum(0)).ravel())
    methods["popularity"] = measure(popularity, y, y.test, read, 0.0)
    return {"seed": seed, "methods": methods, "tuned": tuned, "gnn_weight": result.gnn_weight,
            "gnn_best_epoch": result.best_epoch, "gnn_epochs_run": len(result.history),
            "seconds": round(time.perf_counter() - started, 1)}


class DecoderPopularity:
    """Every user gets the bundles with most training users first."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = torch.from_numpy(counts.astype(np.float32))

    def scores(self, q: sp.csr_matrix) -> torch.Tensor:
        return self.counts.expand(q.shape[0], -1).clone()


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Youshu: user → bundle (BGCN / CrossCBR split)\n",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB RAM, {m['cpu']}. "
             f"`python bench/youshu.py --seeds {','.join(map(str, report['seeds']))}`; "
             f"seeds {report['seeds']}, {report['methods']['gnn']['users']:.0f} test users, every bundle ranked but the "
             f"user's training ones.\n",
             "| method | Recall@20 | NDCG@20 |", "|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['recall']:.4f} ± {m['recall_std']:.4f} | {m['ndcg']:.4f} ± {m['ndcg_std']:.4f} |")
    for name, (r, n) in PUBLISHED.items():
        lines.append(f"| {name}, published | {r:.4f} | {n:.4f} |")
    lines.append(f"\ngnn: the decoder with composition and GNN embeddings as side information (GNN weight "
                 f"{report['gnn_weights']} by seed) plus the tuned read-books term; composition_ease: the same without "
                 f"the GNN; gnn_decoder_only: without the read-books term; read_books_only: how many of a bundle's "
                 f"books the user read. Published rows as quoted in ../shared/data/youshu/README.md.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "youshu")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    y = Youshu.read(args.data)
    # λ grid around the tuning pairs' best (500 of 50–5,000, composition weight 300: bench/results/youshu.md notes)
    cfg = TrainConfig(user_weights=[0.0], decoder_cold_weight=0.0, decoder_lambdas=[200.0, 500.0, 1000.0],
                      decoder_text_weights=[300.0], decoder_gnn_weights=[0.0, 50.0, 200.0])
    runs = [run(y, int(s), cfg) for s in args.seeds.split(",")]
    methods = {}
    for name in runs[0]["methods"]:
        methods[name] = {}
        for m in ("recall", "ndcg", "users"):
            values = np.array([r["methods"][name][m] for r in runs], float)
            methods[name][m] = float(values.mean())
            methods[name][f"{m}_std"] = float(values.std())
    report = {"machine": machine(), "seeds": [r["seed"] for r in runs], "methods": methods, "published": PUBLISHED,
              "gnn_weights": [r["gnn_weight"] for r in runs], "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "youshu.json").write_text(json.dumps(report, indent=2))
    (args.out / "youshu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
