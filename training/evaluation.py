"""``bundlegnn evaluate``: every method on the same time split, with the same queries.

Methods: ``popularity``, ``cooccurrence`` (item-kNN cosine), ``user_history``
(the query's user's own recency-weighted purchases), ``text`` (cosine of text
embeddings), ``ease`` (EASE^R, λ tuned on validation; catalogs up to
:data:`~training.baselines.EASE_MAX_ITEMS` items), ``sansa`` (SANSA's sparse
approximate inverse, its L2 tuned on validation, when the ``sansa`` package is installed: ``make bench``) and ``gnn``:
the model a shop is served, :class:`~training.models.BundleGNN` early-stopped
on validation, run inductively on the full training graph and scoring
through its closed-form decoder with the GNN's embeddings as side
information, plus the tuned weights of a known user's history and of the
GNN's user head. Two ablations show where its score comes from:
``text_ease`` (the same pipeline without the GNN: the decoder point
validation liked best with GNN weight 0, the user's history, no user head)
and ``gnn_head`` (the GNN's own cosine head, no decoder).

Slices: the whole test split (``methods``), ``cold_start`` (queries whose
hidden item had no training order) and ``held_out_items`` (a second split
with a share of items left out of training entirely; see
:mod:`training.protocol`). Every method is scored in chunks of queries
(:func:`~training.protocol.rank_queries`), so a large catalog never needs a
queries × items matrix. Over several seeds :func:`summarise` adds bootstrap
intervals for ``gnn`` against every other method on every slice: a mean
over a few hundred queries moves by a few points between seeds, so a gain
needs its interval to be read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graph.store import GraphConfig, GraphStore
from training import baselines
from training.encoder import TextEncoder
from training.protocol import Events, ScoreFn, Split, per_query, rank_queries, relative_gain, time_split
from training.train import (Graph, TrainConfig, UserHead, decoders_for, head_scores, id_table, pipeline_scores,
                            select_device, side_views, train)

EASE_LAMBDAS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0)
SANSA_LAMBDAS = (5.0, 20.0, 100.0, 500.0)
SLICES = ("methods", "cold_start", "held_out_items")
log = logging.getLogger(__name__)


def _texts(encoder: TextEncoder, store: GraphStore) -> np.ndarray:
    return encoder.encode([item.text for item in store.catalog])


def _methods(split: Split, encoder: TextEncoder, train_cfg: TrainConfig, seed: int,
             peers: bool) -> tuple[dict[str, ScoreFn], dict]:
    """Every method's scorer of ``split``'s test queries, and what was tuned or timed (``peers``: SANSA too)."""
    n_fit, n = split.fit.num_items, split.train.num_items
    text_fit, text_train = _texts(encoder, split.fit), _texts(encoder, split.train)
    methods: dict[str, ScoreFn] = {}
    tuned: dict = {}
    started = time.perf_counter()
    methods["popularity"] = baselines.popularity(split.train)
    methods["cooccurrence"] = baselines.cooccurrence(split.train)
    methods["user_history"] = baselines.user_history(split.train)
    methods["text"] = baselines.text_similarity(text_train)
    def tuned_on_validation(make: Callable[[GraphStore, float], ScoreFn], grid: tuple[float, ...]) -> float:
        """The regularisation in ``grid`` whose model fitted before validation ranks it best (NDCG@10)."""
        val_ndcg = {lam: rank_queries(make(split.fit, lam), split.val, n_fit).metrics(n_fit)["ndcg@10"] for lam in grid}
        return max(val_ndcg, key=val_ndcg.get)

    if n <= baselines.EASE_MAX_ITEMS:
        tuned["ease_lambda"] = lam = tuned_on_validation(baselines.ease, EASE_LAMBDAS)
        methods["ease"] = baselines.ease(split.train, lam)
    if peers and baselines.sansa_installed():
        tuned["sansa_l2"] = lam = tuned_on_validation(baselines.sansa, SANSA_LAMBDAS)
        methods["sansa"] = baselines.sansa(split.train, lam)
    elif peers:  # said in the report: a peer left out must not look like a peer beaten
        tuned["peers_not_run"] = ["sansa"]
        log.warning("the sansa peer is not installed (`make bench` installs it): this evaluation runs without it")
    baselines_s = time.perf_counter() - started

    started = time.perf_counter()
    result = train(split.fit, text_fit, train_cfg.model_copy(update={"seed": seed}), val=split.val)
    graph = Graph.build(split.train, text_train, select_device(train_cfg.device), id_items=id_table(split.fit),
                        co_per_item=train_cfg.co_edges_per_item, ui_per_user=train_cfg.ui_edges_per_user)
    text_only = {d: v for d, v in result.decoder_val.items() if d.gnn_weight == 0}
    best = max(text_only, key=text_only.get) if text_only else None
    head = UserHead.of(result.model, graph)
    fits = decoders_for([d for d in (result.decoder, best) if d is not None], graph,
                        side_views(result.model, graph, head.h["item"]))
    if result.decoder is not None:
        methods["gnn"] = pipeline_scores(next(fits), graph, result.user_weight, head, result.head_weight)
    gnn_s = time.perf_counter() - started
    methods["gnn_head"] = head_scores(result.model, graph, head.h)
    if best is not None:  # the same pipeline without the GNN's embeddings
        methods["text_ease"] = pipeline_scores(next(fits), graph, result.user_weight)
    tuned.update({"gnn_best_epoch": result.best_epoch, "gnn_epochs_run": len(result.history),
                  # stopped by training.gnn_budget_s: what the GNN learnt then depends on the machine's speed and load
                  "gnn_epochs_stopped_by_budget": bool(result.phases.get("gnn_epochs_stopped_by_budget")),
                  "gnn_decoder": result.decoder.model_dump() if result.decoder else None,
                  "gnn_weight": result.gnn_weight, "user_weight": result.user_weight,
                  "user_weight_val_ndcg@10": {str(k): v for k, v in result.user_val.items()},
                  "head_weight": result.head_weight,
                  "head_weight_val_ndcg@10": {str(k): v for k, v in result.head_val.items()},
                  "text_ease": best.model_dump() if best else None,
                  "timings": {"baselines_s": round(baselines_s, 1), "gnn_train_s": round(gnn_s, 1)}})
    return methods, tuned


def evaluate(events: Events, graph_cfg: GraphConfig, train_cfg: TrainConfig,
             encoder: TextEncoder, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1,
             held_out: float = 0.1, peers: bool = True) -> dict:
    """Run the protocol once; return ``{"methods", "cold_start", "held_out_items", "protocol", "timings",
    "ranks"}`` (``ranks``: each method's rank of every query's hidden item, per slice, for the intervals).

    ``held_out_items`` (skipped when ``held_out`` is 0) comes from a second split with that share of
    items left out of training entirely, every method retrained, on the queries that hide one of them.
    """
    split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac)
    methods, tuned = _methods(split, encoder, train_cfg, seed, peers)
    n = split.train.num_items
    report: dict = {part: {} for part in SLICES}
    report["timings"] = tuned.pop("timings")
    report["ranks"] = {part: {} for part in SLICES}
    cold = split.test.cold
    for name, score in methods.items():
        started = time.perf_counter()
        ranked = rank_queries(score, split.test, n)
        report["timings"][f"{name}_rank_s"] = round(time.perf_counter() - started, 1)
        for part, got in (("methods", ranked), ("cold_start", ranked.subset(cold))):
            report[part][name] = got.metrics(n)
            report["ranks"][part][name] = got.rank.tolist()
    report["protocol"] = {**split.protocol, **tuned}
    if held_out:
        split = time_split(events, graph_cfg, seed=seed, test_frac=test_frac, val_frac=val_frac, held_out=held_out)
        methods, tuned = _methods(split, encoder, train_cfg, seed, peers)
        held = split.held_out_queries()
        queries = split.test.subset(held)
        for name, score in methods.items():
            got = rank_queries(score, queries, split.train.num_items)
            report["held_out_items"][name] = got.metrics(split.train.num_items)
            report["ranks"]["held_out_items"][name] = got.rank.tolist()
        report["protocol"].update({k: split.protocol[k] for k in ("held_out", "held_out_items", "held_out_test_queries")})
        report["protocol"]["held_out_split"] = tuned
    return report


def summarise(runs: list[dict]) -> dict:
    """Mean and std over seeds of every metric: ``{"methods": {name: {metric: x, metric_std: s}}, ...}``,
    and ``comparisons``: ``{slice: {"gnn vs ease": {"hr@10": {"gain", "low", "high", "runs"}, ...}}}``, the
    relative gain over every seed's queries with its 95 % bootstrap interval and each seed's gain
    (see :func:`compare`)."""
    out: dict = {"seeds": [r["protocol"]["seed"] for r in runs], "runs": runs}
    for part in SLICES:
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


def merge(summaries: list[dict]) -> dict:
    """One summary (:func:`summarise`) of the runs of several ``evaluate`` reports, e.g. one seed per job on a
    catalog where a seed takes an hour: the means, stds and intervals come from every run's ranks, as if they
    had run in one command. A report may itself be a merge. The runs must come from the same commit and the
    same command apart from ``--seeds``, and no seed may repeat: otherwise :class:`ValueError` says which
    differs."""
    if not summaries:
        raise ValueError("nothing to merge")
    for s in summaries:
        if "runs" not in s or "provenance" not in s:
            raise ValueError("a report to merge needs its runs and provenance (written by `evaluate --json`)")
    parts = [p for s in summaries for p in s["provenance"].get("merged", [s["provenance"]])]
    commits = sorted({p["commit"] for p in parts})
    if len(commits) > 1:
        raise ValueError(f"reports from different commits cannot be merged: {', '.join(commits)}")
    commands = sorted({_without_seeds(p["command"]) for p in parts})
    if len(commands) > 1:
        raise ValueError(f"reports from different commands cannot be merged: {' / '.join(commands)}")
    runs = [r for s in summaries for r in s["runs"]]
    seeds = [r["protocol"]["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"a seed repeats among the reports: {seeds}")
    out = summarise(runs)
    out["provenance"] = {**parts[0], "date": max(p["date"] for p in parts),
                         "command": f"{commands[0]} --seeds {','.join(map(str, seeds))} (merged from "
                                    f"{len(parts)} runs)",
                         "wall_s": sum(p.get("wall_s", 0) for p in parts), "merged": parts}
    return out


def _without_seeds(command: str) -> str:
    words = command.split()
    for k, word in enumerate(words[:-1]):
        if word == "--seeds":
            return " ".join(words[:k] + words[k + 2 :])
    return command


def compare(runs: list[dict]) -> dict:
    """The relative gain of ``gnn`` over every other method on HR@10 and NDCG@10, per slice, over every run's
    queries, with its 95 % interval and each run's gain (see :func:`training.protocol.relative_gain`); and
    ``text_ease`` (the pipeline without the GNN) over ``ease`` where both ran."""
    out: dict = {}
    for part in SLICES:
        found = [r.get("ranks", {}).get(part, {}) for r in runs]
        if not all(found):
            continue
        names = [m for m in found[0] if all(m in f for f in found)]
        pairs = [("gnn", m) for m in names if m != "gnn"] + [("text_ease", "ease")]
        for a, b in pairs:
            if a not in names or b not in names or not all(len(f[a]) for f in found):
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
    if summary["protocol"].get("peers_not_run"):
        lines.append(f"Not run: {', '.join(summary['protocol']['peers_not_run'])} (not installed here; `make bench` "
                     "installs the peers).\n")
    for part in SLICES:
        if part not in summary:
            continue
        queries = round(next(iter(summary[part].values()))["queries"])
        lines += [f"\n{part} ({queries} queries{', mean ± std over seeds ' + str(seeds) if len(seeds) > 1 else ''})\n",
                  "| method | hr@10 | ndcg@10 | recall@20 | mrr | coverage |", "|---|---|---|---|---|---|"]
        for name, m in summary[part].items():
            cells = [f"{m[k]:.4f} ± {m[k + '_std']:.4f}" for k in ("hr@10", "ndcg@10", "recall@20", "mrr", "coverage")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = [r["protocol"] for r in summary.get("runs", []) if "gnn_epochs_run" in r["protocol"]]
    if runs:  # whether the time budget, not the epochs or patience, ended a seed's training
        lines.append("\nGNN epochs: " + "; ".join(
            f"seed {p['seed']} {p['gnn_epochs_run']} (best {p['gnn_best_epoch']}"
            f"{', stopped by training.gnn_budget_s' if p.get('gnn_epochs_stopped_by_budget') else ''})"
            for p in runs) + ".")
    for part, pairs in summary["comparisons"].items():
        lines += [f"\n{part}: relative gain over every seed's queries [95 % interval, seeds and queries "
                  f"resampled]; each seed's gain\n",
                  "| comparison | hr@10 | ndcg@10 |", "|---|---|---|"]
        for name, m in pairs.items():
            cells = [gain_cell(m[k]) for k in ("hr@10", "ndcg@10")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def gain_cell(g: dict) -> str:
    """A relative gain as a table cell: the gain [interval]; each run's gain. Over a method that scored 0 a gain
    has no size: "n/a (the other scores 0)"."""
    if not np.isfinite(g["gain"]):
        return "n/a (the other scores 0)"
    cell = f"{g['gain']:+.1%} [{g['low']:+.1%}, {g['high']:+.1%}]"
    return cell + (f"; {', '.join(f'{x:+.1%}' for x in g['runs'])}" if len(g["runs"]) > 1 else "")


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
