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
Over several seeds, :func:`summarise` adds bootstrap intervals for the gains
that matter (``COMPARISONS``): a mean over 256 queries moves by a few points
between seeds, so a gain needs its interval to be read.
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
from training.protocol import Queries, Split, evaluate_scores, per_query, ranks, relative_gain, time_split
from training.train import Graph, TrainConfig, id_table, score_queries, select_device, train

EASE_LAMBDAS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0)
# (method, baseline) pairs whose relative gain gets a bootstrap interval, per slice
COMPARISONS = {
    "methods": [("gnn", "ease"), ("gnn", "text_ease"), ("text_ease", "ease")],
    "held_out_items": [("gnn", "text"), ("gnn", "text_ease")],
}


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
    """Run the protocol once; return ``{"methods", "cold_start", "held_out_items", "protocol", "timings",
    "ranks"}`` (``ranks``: each method's rank of every query's hidden item, per slice, for the intervals).

    ``held_out_items`` (skipped when ``held_out`` is 0) comes from a second split with that share of
    items left out of training entirely, every method retrained, on the queries that hide one of them.
    """
    split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac)
    methods, tuned = _methods(split, encoder, train_cfg, seed)
    n = split.train.num_items
    report: dict = {"methods": {}, "cold_start": {}, "held_out_items": {}, "timings": tuned.pop("timings"),
                    "ranks": {"methods": {}, "held_out_items": {}}}
    cold = split.test.cold
    for name, scores in methods.items():
        report["methods"][name] = evaluate_scores(scores, split.test, n)
        report["cold_start"][name] = evaluate_scores(scores[cold], split.test.subset(cold), n)
        report["ranks"]["methods"][name] = ranks(scores, split.test).tolist()
    report["protocol"] = {**split.protocol, **tuned}
    if held_out:
        split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac, held_out=held_out)
        methods, tuned = _methods(split, encoder, train_cfg, seed)
        held = split.held_out_queries()
        for name, scores in methods.items():
            report["held_out_items"][name] = evaluate_scores(scores[held], split.test.subset(held), split.train.num_items)
            report["ranks"]["held_out_items"][name] = ranks(scores[held], split.test.subset(held)).tolist()
        report["protocol"].update({k: split.protocol[k] for k in ("held_out", "held_out_items", "held_out_test_queries")})
        report["protocol"]["held_out_split"] = tuned
    return report


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric: ``{"methods": {name: {metric: x, metric_std: s}}, ...}``,
    and ``comparisons``: ``{slice: {"gnn vs ease": {"hr@10": {"gain", "low", "high", "runs"}, ...}}}``, the
    relative gain over every seed's queries with its 95 % bootstrap interval and each seed's gain
    (see :func:`compare`)."""
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
    out["comparisons"] = compare(runs)
    return out


def compare(runs: list[dict]) -> dict:
    """The relative gain of each pair in ``COMPARISONS`` on HR@10 and NDCG@10 over every run's queries,
    with its 95 % interval and each run's gain (see :func:`training.protocol.relative_gain`)."""
    out: dict = {}
    for part, pairs in COMPARISONS.items():
        found = [r.get("ranks", {}).get(part, {}) for r in runs]
        for a, b in pairs:
            if not all(a in f and b in f for f in found):
                continue
            each_a = [per_query(torch.tensor(f[a])) for f in found]
            each_b = [per_query(torch.tensor(f[b])) for f in found]
            out.setdefault(part, {})[f"{a} vs {b}"] = {
                metric: relative_gain([x[metric] for x in each_a], [y[metric] for y in each_b])
                for metric in ("hr@10", "ndcg@10")}
    return out


def markdown(summary: dict) -> str:
    """The summary as markdown tables: every slice's metrics (mean ± std over seeds), then the gains."""
    seeds = summary["seeds"]
    lines = []
    for part in ("methods", "cold_start", "held_out_items"):
        if part not in summary:
            continue
        queries = round(next(iter(summary[part].values()))["queries"])
        lines += [f"\n{part} ({queries} queries{', mean ± std over seeds ' + str(seeds) if len(seeds) > 1 else ''})\n",
                  "| method | hr@10 | ndcg@10 | recall@20 | mrr | coverage |", "|---|---|---|---|---|---|"]
        for name, m in summary[part].items():
            cells = [f"{m[k]:.4f} ± {m[k + '_std']:.4f}" for k in ("hr@10", "ndcg@10", "recall@20", "mrr", "coverage")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for part, pairs in summary["comparisons"].items():
        lines += [f"\n{part}: relative gain over every seed's queries [95 % interval, seeds and queries "
                  f"resampled]; each seed's gain\n",
                  "| comparison | hr@10 | ndcg@10 |", "|---|---|---|"]
        for name, m in pairs.items():
            cells = [f"{m[k]['gain']:+.1%} [{m[k]['low']:+.1%}, {m[k]['high']:+.1%}]"
                     + (f"; {', '.join(f'{g:+.1%}' for g in m[k]['runs'])}" if len(m[k]["runs"]) > 1 else "")
                     for k in ("hr@10", "ndcg@10")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


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
