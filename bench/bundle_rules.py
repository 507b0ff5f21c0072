"""The builder's rules as a trade-off: F1 against substitute rate on *validation* bundles (issue 20).

The default rules (``scoring.substitute_similarity`` 0.85: two never co-purchased items of one category
with text cosine ≥ 0.85 are substitutes, never in one bundle; ``serving.rules.max_per_category`` 2) keep the
builder's substitute rate at a third of the anchors' top complements', and its F1 below theirs on Clothing
and Food; relaxed rules lift F1 and the substitute rate together (bench/results/bundles*.md). Which point to
serve is the shop's call; this program measures the curve where a choice may be made: on each domain the
model is trained on the events before a *validation* cut (the last 20 % of the training bundles by time, as
``evaluate --task bundle`` cuts its test bundles), every item's list is published, and the builder (with the
model's pair model) and the top complements answer the validation bundles' ``one_item`` queries under each
rule setting: the substitute threshold (None: no substitute rule) × the category cap × the weight of the
pair model's set term (``serving.rules.pair_weight``; 0: each candidate ranked by its fit with the anchor
alone); then, with no category cap and with a cap of 3, the substitute rule as a cost
(``serving.rules.substitute_penalty``: log-odds off per substitute pair) at thresholds 0.85 and 0.9. F1 of the
first set and its substitute rate (the data's label, :meth:`~training.intent_bundles.IntentBundles.interchangeable`).
The pair model is fitted on ``--pair-folds`` time folds of orders (``training.pair_folds``; 3, as the tuned lines
of ``make bench`` use), once per threshold with the substitute flags of that threshold, as a run under it fits it
(:func:`serving.bundle_fit.refit`).

Why the rules cost F1 (``picks``): of the items the builder (no substitute rule, no cap) and the top
complements put in the first set, the share interchangeable with the anchor by the data's label, and flagged
by the worker's detector at 0.85, each with its hit rate (the item is a real member) beside the other picks'.

Writes bench/results/bundle_rules.{json,md} (seed 0: the picks of ``make bench``'s tuned lines) or, for another
seed, bundle_rules_seed<N>.{json,md} (a check that the picks hold on another training). Usage: ``python
bench/bundle_rules.py [--domains electronic,...] [--seed 0] [--pair-folds 3]`` (about 7 min a domain on 2 cores:
three trainings, 52 rule settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import OUT, machine  # noqa: E402

from bundlegnn.config import load_settings  # noqa: E402
from serving.bundle_eval import BundleQuery, Method, bundle_queries, methods, scores, serve  # noqa: E402
from serving.bundle_fit import Fold, refit  # noqa: E402
from training.complements import ComplementScorer  # noqa: E402
from training.intent_bundles import IntentBundles  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "amazon_intent_bundles"
THRESHOLDS = (0.85, 0.9, 0.95, None)  # None: no substitute rule
CAPS = (2, 3, None)
PAIR_WEIGHTS = (0.0, 0.25, 1.0)
PENALTIES = (0.25, 0.5, 1.0, 2.0)  # with thresholds 0.85 and 0.9, no cap or a cap of 3, pair weight 0.25


def domain(name: str, seed: int, pair_folds: int) -> dict:
    """Every rule setting's F1 and substitute rate on one domain's validation bundles."""
    settings = load_settings(None)
    encoder = settings.encoder.build(settings.paths.text_cache)
    data = IntentBundles.read(DATA / name)
    train_bundles, _, _ = data.split(0.2)
    cut = train_bundles[min(int(len(train_bundles) * 0.8), len(train_bundles) - 1)].epoch
    val_bundles = [b for b in train_bundles if b.epoch >= cut]
    training = settings.training.model_copy(update={"seed": seed, "pair_folds": pair_folds})
    folds: list[Fold] = []
    served = serve(data, cut, settings.graph, training, settings.scoring, encoder, folds)
    queries = bundle_queries(val_bundles, "one_item", set(served.store.items.ids))
    text_rows = np.flatnonzero(served.text.any(1))
    published = dict(served.view.entries)
    fitted = served.fit  # under settings.scoring

    def mean_scores(method: Method) -> dict[str, float]:
        got = [scores(q, method(q, 5), data) for q in queries]
        return {m: float(np.mean([g[m] for g in got])) for m in ("f1_top1", "substitute_rate")}

    # the published lists, best first: the rules do not change them
    top = mean_scores(methods(served, settings.serving.rules, settings.scoring)["top_complements"])
    grid = [(t, c, w, None) for t, c, w in itertools.product(THRESHOLDS, CAPS, PAIR_WEIGHTS)]
    grid += [(t, c, 0.25, p) for t in (0.85, 0.9) for c in (None, 3) for p in PENALTIES]
    grid.sort(key=lambda g: (g[0] is None, g[0] or 0.0))  # one scorer per threshold; no substitute rule (None) last
    rows, flags = [], {}
    for threshold, settings_at in itertools.groupby(grid, key=lambda g: g[0]):
        scoring = settings.scoring.model_copy(update={"substitute_similarity": threshold} if threshold is not None
                                              else {"max_substitutes": 0})
        scorer = ComplementScorer(served.store, scoring)
        scorer.set_text(text_rows, served.text[text_rows])
        for item, entry in published.items():  # the lists as published; their substitutes under this threshold
            served.view.entries[item] = dataclasses.replace(entry, substitutes=frozenset(scorer.substitutes(item)))
        if threshold == 0.85:
            flags = {item: e.substitutes for item, e in served.view.entries.items()}
        if fitted is not None:  # the pair model a run under this threshold fits (the served one: as served)
            served.fit = fitted if scoring == settings.scoring else refit(folds, scoring, served.store.items.index,
                                                                          served.text)
        for _, cap, pair_weight, penalty in settings_at:
            rules = settings.serving.rules.model_copy(update={"max_per_category": cap, "pair_weight": pair_weight,
                                                              "substitute_penalty": penalty})
            builder = methods(served, rules, scoring)["builder"]
            row = {"substitute_similarity": threshold, "max_per_category": cap, "pair_weight": pair_weight,
                   "substitute_penalty": penalty, "builder": mean_scores(builder), "top_complements": top}
            row["f1_gain"] = row["builder"]["f1_top1"] / top["f1_top1"] - 1
            rows.append(row)
            print(f"  {name} {row}", flush=True)
    # the view is at threshold None now (no substitutes): the builder without the rule, and the top complements
    free = settings.serving.rules.model_copy(update={"max_per_category": None, "pair_weight": 0.25})
    answering = methods(served, free, settings.scoring)
    picks = {m: _picks(answering[m], queries, data, flags) for m in ("builder", "top_complements")}
    return {"domain": name, "seed": seed, "pair_folds": pair_folds, "validation_bundles": len(val_bundles),
            "queries": len(queries), "cut": cut, "rows": rows, "picks": picks}


def _picks(method: Method, queries: list[BundleQuery], data: IntentBundles, flags: dict[str, frozenset[str]]) -> dict:
    """Over the first set of every query: how many picks, their hit rate, and for picks interchangeable with
    the anchor (the data's label) and flagged with it by the detector (``flags``: each item's substitutes), their
    share and hit rate beside the other picks'."""
    rows = []
    for q in queries:
        found = method(q, 1)
        for item in found[0] if found else []:
            rows.append((item in q.hidden, any(data.interchangeable(a, item) for a in q.anchors),
                         any(item in flags.get(a, ()) or a in flags.get(item, ()) for a in q.anchors)))
    hit, label, flagged = (np.array(c, bool) for c in zip(*rows)) if rows else (np.zeros(0, bool),) * 3

    def split(mask: np.ndarray) -> dict[str, float]:
        return {"share": float(mask.mean()), "hit": float(hit[mask].mean()) if mask.any() else float("nan"),
                "hit_others": float(hit[~mask].mean()) if (~mask).any() else float("nan")}

    return {"picks": len(rows), "hit": float(hit.mean()) if rows else float("nan"),
            "interchangeable": split(label), "flagged_085": split(flagged)}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Bundle rules: F1 against substitute rate on validation bundles", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores. `python bench/bundle_rules.py`; seed "
             f"{report['domains'][0]['seed']}; the pair model on {report['domains'][0]['pair_folds']} time "
             "fold(s) of orders, refitted under each threshold's substitute flags; one_item queries of the last "
             "20 % of each domain's training bundles (by time), the model trained on the events before them. "
             "substitute_similarity: none = no substitute rule; substitute_penalty: never = substitutes are "
             "excluded, a number = the log-odds a substitute pair costs; top complements do not depend on the "
             "rules (their lists are the same).", ""]
    for d in report["domains"]:
        lines += [f"## {d['domain']}: {d['validation_bundles']} validation bundles, {d['queries']} queries", "",
                  "| substitute_similarity | max_per_category | pair_weight | substitute_penalty | builder F1 | "
                  "builder substitute rate | top complements F1 | top complements substitute rate | F1 gain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            b, t, penalty = r["builder"], r["top_complements"], r.get("substitute_penalty")
            cost = "" if r["substitute_similarity"] is None else "never" if penalty is None else f"{penalty:g}"
            lines.append(f"| {r['substitute_similarity'] or 'none'} | {r['max_per_category'] or 'none'} | "
                         f"{r['pair_weight']:g} | {cost} | {b['f1_top1']:.4f} | "
                         f"{b['substitute_rate']:.4f} | {t['f1_top1']:.4f} | {t['substitute_rate']:.4f} | "
                         f"{r['f1_gain']:+.1%} |")
        lines += ["", "Picks of the first set (builder: no substitute rule, no cap, pair weight 0.25), and the hit "
                  "rate of those interchangeable with the anchor (the data's label) or flagged with it by the "
                  "detector at 0.85, beside the other picks':", "",
                  "| method | picks | hit rate | interchangeable: share / hit / others' hit | flagged at 0.85: "
                  "share / hit / others' hit |", "|---|---|---|---|---|"]
        for m, p in d.get("picks", {}).items():
            cells = [f"{p[k]['share']:.3f} / {p[k]['hit']:.3f} / {p[k]['hit_others']:.3f}"
                     for k in ("interchangeable", "flagged_085")]
            lines.append(f"| {m} | {p['picks']} | {p['hit']:.3f} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="electronic,clothing,food")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pair-folds", type=int, default=3, help="training.pair_folds of the pair model")
    args = parser.parse_args()
    report = {"machine": machine(),
              "domains": [domain(d, args.seed, args.pair_folds) for d in args.domains.split(",")]}
    OUT.mkdir(parents=True, exist_ok=True)
    name = "bundle_rules" if args.seed == 0 else f"bundle_rules_seed{args.seed}"
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))
    (OUT / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
