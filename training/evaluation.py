"""``bundlegnn evaluate``: every method on the same time split, with the same queries.

Methods: ``popularity``, ``cooccurrence`` (item-kNN cosine), ``ease``
(EASE^R, λ tuned on validation), ``text`` (cosine of text embeddings) and
``gnn`` (:class:`~training.models.BundleGNN`, early-stopped on validation,
trained on the orders before the validation window and run inductively on
the full training graph, scoring through its closed-form decoder). Two
ablations show where the GNN's score comes from: ``text_ease`` (the same
decoder with text side information only, i.e. no GNN; tuned on the same grid)
and ``gnn_head`` (the GNN's own cosine head, no decoder). ``cold_start``
repeats the metrics on the queries whose hidden item had no training order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graph.events import ItemUpserted, Order
from graph.store import GraphConfig, GraphStore
from training import baselines
from training.encoder import TextEncoder
from training.protocol import Queries, Split, evaluate_scores, time_split
from training.train import Graph, TrainConfig, id_table, score_queries, select_device, train

EASE_LAMBDAS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0)


def _texts(encoder: TextEncoder, store: GraphStore) -> np.ndarray:
    return encoder.encode([item.text for item in store.catalog])


def _linear(fn: Callable[[GraphStore], tuple[torch.Tensor, torch.Tensor]], store: GraphStore, q: Queries) -> torch.Tensor:
    s, b = fn(store)
    return q.matrix(store.num_items) @ s + b


def _report(scores: torch.Tensor, q: Queries, n: int) -> tuple[dict[str, float], dict[str, float]]:
    cold = q.cold
    return evaluate_scores(scores, q, n), evaluate_scores(scores[cold], q.subset(cold), n)


def evaluate(events: list[ItemUpserted | Order], graph_cfg: GraphConfig, train_cfg: TrainConfig,
             encoder: TextEncoder, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1) -> dict:
    """Run the protocol once; return ``{"methods", "cold_start", "protocol", "timings"}``."""
    split: Split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac)
    n_fit, n = split.fit.num_items, split.train.num_items
    text_fit, text_train = _texts(encoder, split.fit), _texts(encoder, split.train)
    methods: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}

    started = time.perf_counter()
    methods["popularity"] = _linear(baselines.popularity, split.train, split.test)
    methods["cooccurrence"] = _linear(baselines.cooccurrence, split.train, split.test)
    val_ndcg = {lam: evaluate_scores(_linear(lambda s: baselines.ease(s, lam), split.fit, split.val), split.val, n_fit)["ndcg@10"]
                for lam in EASE_LAMBDAS}
    lam = max(val_ndcg, key=val_ndcg.get)
    methods["ease"] = _linear(lambda s: baselines.ease(s, lam), split.train, split.test)
    methods["text"] = split.test.matrix(n) @ baselines.text_similarity(text_train)[0]
    timings["baselines_s"] = time.perf_counter() - started

    started = time.perf_counter()
    result = train(split.fit, text_fit, train_cfg.model_copy(update={"seed": seed}), val=split.val)
    graph = Graph.build(split.train, text_train, select_device(train_cfg.device), id_items=id_table(split.fit))
    methods["gnn"] = score_queries(result.model, graph, split.test, result.decoder)
    timings["gnn_train_s"] = time.perf_counter() - started
    methods["gnn_head"] = score_queries(result.model, graph, split.test)
    text_only = {d: v for d, v in result.decoder_val.items() if d.gnn_weight == 0}
    if text_only:
        best = max(text_only, key=text_only.get)
        methods["text_ease"] = _linear(lambda s: baselines.text_ease(s, text_train, best.lam, best.text_weight),
                                       split.train, split.test)

    report: dict = {"methods": {}, "cold_start": {}, "timings": {k: round(v, 1) for k, v in timings.items()}}
    for name, scores in methods.items():
        report["methods"][name], report["cold_start"][name] = _report(scores, split.test, n)
    report["protocol"] = {**split.protocol, "ease_lambda": lam, "gnn_best_epoch": result.best_epoch,
                          "gnn_epochs_run": len(result.history),
                          "gnn_decoder": result.decoder.model_dump() if result.decoder else None,
                          "text_ease": best.model_dump() if text_only else None}
    return report


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric: ``{"methods": {name: {metric: x, metric_std: s}}, ...}``."""
    out: dict = {"seeds": [r["protocol"]["seed"] for r in runs], "runs": runs}
    for part in ("methods", "cold_start"):
        out[part] = {}
        for name in runs[0][part]:
            metrics = runs[0][part][name]
            out[part][name] = {}
            for metric in metrics:
                values = np.array([r[part][name][metric] for r in runs], float)
                out[part][name][metric] = float(values.mean())
                if metric != "queries":
                    out[part][name][f"{metric}_std"] = float(values.std())
    out["protocol"] = {k: v for k, v in runs[0]["protocol"].items() if k != "seed"}
    return out


def plot(summary: dict, path: Path) -> None:
    """A grouped bar chart of the test metrics per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["hr@10", "ndcg@10", "recall@20", "mrr", "coverage"]
    names = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        m = summary["methods"][name]
        ax.bar(np.arange(len(metrics)) + k * width, [m[x] for x in metrics], width,
               yerr=[m.get(f"{x}_std", 0) for x in metrics], label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set_ylabel("test score")
    ax.set_title(f"basket completion, {summary['protocol']['test_queries']} test queries, seeds {summary['seeds']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
