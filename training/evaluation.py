"""``bundlegnn evaluate``: every method on the same time split, with the same queries.

Methods: ``popularity``, ``cooccurrence`` (item-kNN cosine), ``ease``
(EASE^R, λ tuned on validation), ``text`` (cosine of text embeddings) and
``gnn`` (:class:`~training.models.BundleGNN`, early-stopped on validation,
trained on the orders before the validation window and run inductively on
the full training graph, scoring through its closed-form decoder). Two
ablations show where the GNN's score comes from: ``text_ease`` (the same
decoder with text side information only, i.e. no GNN; tuned on the same grid)
and ``gnn_head`` (the GNN's own cosine head, no decoder). ``cold_start``
repeats the metrics on the queries whose hidden item had no training order;
``held_out_items`` on a leave-items-out split (see :mod:`training.protocol`).
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


def _methods(split: Split, encoder: TextEncoder, train_cfg: TrainConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Every method's ``(Q, num_items)`` test scores on ``split``, and what was tuned or timed."""
    n_fit, n = split.fit.num_items, split.train.num_items
    text_fit, text_train = _texts(encoder, split.fit), _texts(encoder, split.train)
    methods: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    methods["popularity"] = _linear(baselines.popularity, split.train, split.test)
    methods["cooccurrence"] = _linear(baselines.cooccurrence, split.train, split.test)
    val_ndcg = {lam: evaluate_scores(_linear(lambda s: baselines.ease(s, lam), split.fit, split.val), split.val, n_fit)["ndcg@10"]
                for lam in EASE_LAMBDAS}
    lam = max(val_ndcg, key=val_ndcg.get)
    methods["ease"] = _linear(lambda s: baselines.ease(s, lam), split.train, split.test)
    methods["text"] = split.test.matrix(n) @ baselines.text_similarity(text_train)[0]
    baselines_s = time.perf_counter() - started

    started = time.perf_counter()
    result = train(split.fit, text_fit, train_cfg.model_copy(update={"seed": seed}), val=split.val)
    graph = Graph.build(split.train, text_train, select_device(train_cfg.device), id_items=id_table(split.fit))
    methods["gnn"] = score_queries(result.model, graph, split.test, result.decoder)
    gnn_s = time.perf_counter() - started
    methods["gnn_head"] = score_queries(result.model, graph, split.test)
    text_only = {d: v for d, v in result.decoder_val.items() if d.gnn_weight == 0}
    best = max(text_only, key=text_only.get) if text_only else None
    if best is not None:
        methods["text_ease"] = _linear(
            lambda s: baselines.text_ease(s, text_train, best.lam, best.text_weight, best.cold_weight), split.train, split.test)
    tuned = {"ease_lambda": lam, "gnn_best_epoch": result.best_epoch, "gnn_epochs_run": len(result.history),
             "gnn_decoder": result.decoder.model_dump() if result.decoder else None,
             "text_ease": best.model_dump() if best else None,
             "timings": {"baselines_s": round(baselines_s, 1), "gnn_train_s": round(gnn_s, 1)}}
    return methods, tuned


def evaluate(events: list[ItemUpserted | Order], graph_cfg: GraphConfig, train_cfg: TrainConfig,
             encoder: TextEncoder, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1,
             held_out: float = 0.1) -> dict:
    """Run the protocol once; return ``{"methods", "cold_start", "held_out_items", "protocol", "timings"}``.

    ``held_out_items`` (skipped when ``held_out`` is 0) comes from a second split with that share of
    items left out of training entirely, every method retrained, on the queries that hide one of them.
    """
    split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac)
    methods, tuned = _methods(split, encoder, train_cfg, seed)
    n = split.train.num_items
    report: dict = {"methods": {}, "cold_start": {}, "held_out_items": {}, "timings": tuned.pop("timings")}
    cold = split.test.cold
    for name, scores in methods.items():
        report["methods"][name] = evaluate_scores(scores, split.test, n)
        report["cold_start"][name] = evaluate_scores(scores[cold], split.test.subset(cold), n)
    report["protocol"] = {**split.protocol, **tuned}
    if held_out:
        split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac, held_out=held_out)
        methods, tuned = _methods(split, encoder, train_cfg, seed)
        held = split.held_out_queries()
        for name, scores in methods.items():
            report["held_out_items"][name] = evaluate_scores(scores[held], split.test.subset(held), split.train.num_items)
        report["protocol"].update({k: split.protocol[k] for k in ("held_out", "held_out_items", "held_out_test_queries")})
        report["protocol"]["held_out_split"] = tuned
    return report


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric: ``{"methods": {name: {metric: x, metric_std: s}}, ...}``."""
    out: dict = {"seeds": [r["protocol"]["seed"] for r in runs], "runs": runs}
    for part in ("methods", "cold_start", "held_out_items"):
        if not runs[0].get(part):
            continue
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
