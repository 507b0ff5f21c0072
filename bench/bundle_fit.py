"""A learned bundle-fit score against the anchor's top complements, on the Amazon intent bundles (issue 20).

Measured the set builder's fitted score (:mod:`serving.bundle_fit`, now built into ``serving.bundles``) before it
was built in, here on matrices of one query's items, with settings the builder does not have (a text-cosine
substitute rule, the pair weight, a fit on bundles instead of orders): a logistic model of "``b`` goes into a bundle
with ``a``" over what the API's view knows of a pair (``a``'s relevance for ``b`` and back, ``b``'s rank in ``a``'s
list, same category, title word overlap, the worker's substitute flag, ``b``'s popularity; the model now also weighs
the rarest shared title word and their products), fitted on a *validation* period: the model is trained on the
events before a validation cut (as ``evaluate --task bundle`` trains on those before the test cut), every item's
list is published, and the logistic model is fitted on the pairs of the validation period's orders (sessions: what
any shop has) or of its bundles. Then the model of the test cut answers the test bundles' ``one_item`` queries, as
in ``evaluate --task bundle``: the anchor's top complements, or its candidates re-ranked by the fitted score,
greedily, each new member's score plus ``pair_weight`` × its mean score with the members already chosen (a set
term), optionally under a substitute rule (same category and text cosine ≥ t). F1 of the first set (the real
bundle's size) and its substitute rate (the data's label:
:meth:`~training.intent_bundles.IntentBundles.interchangeable`), with the paired bootstrap interval of the F1 gain
over top complements.

Writes bench/results/bundle_fit.{json,md}. Usage: ``python bench/bundle_fit.py [--domains electronic,...]
[--seed 0]`` (about 10 min a domain on 2 cores: two trainings).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import OUT, machine  # noqa: E402

from bundlegnn.config import load_settings  # noqa: E402
from bundlegnn.provenance import describe  # noqa: E402
from serving.bundle_eval import BundleQuery, Served, _merged, bundle_queries, serve  # noqa: E402
from serving.bundle_fit import PairModel  # noqa: E402
from training.complements import unit  # noqa: E402
from training.evaluation import gain_cell  # noqa: E402
from training.intent_bundles import IntentBundles, RealBundle  # noqa: E402
from training.protocol import relative_gain  # noqa: E402
from training.titles import title_overlap, title_words  # noqa: E402

CANDIDATES = 50
PAIR_WEIGHTS = (0.0, 0.25, 0.5)
THRESHOLDS = (None, 0.95, 0.9)


def query_matrices(served: Served, q: BundleQuery) -> dict:
    """The anchor and its best candidates (its published list), with every pair's view facts among them."""
    view, store = served.view, served.store
    a = q.anchors[0]
    ranked = _merged([view.entries[a].relevance if a in view.entries else {}])
    items = [a] + [i for i in ranked if i != a][:CANDIDATES]
    rows = np.array([store.items.index[i] for i in items])
    text = unit(served.text[rows])
    rel = np.array([[view.relevance(x, y) for y in items] for x in items], np.float32)
    cats = [view.info(i).category for i in items]
    titles = [view.info(i).title for i in items]
    words = [title_words(t) for t in titles]
    return {"items": items, "hidden": set(q.hidden), "rel": rel, "text": text @ text.T,
            "same": np.array([[c is not None and c == d for d in cats] for c in cats], np.float32),
            "overlap": np.array([[title_overlap(s, t) for t in titles] for s in titles], np.float32),
            "subst": np.array([[view.substitutes(x, y) for y in items] for x in items], np.float32),
            "rare": np.array([[max((view.rarity(w) for w in s & t), default=0.0) for t in words] for s in words],
                             np.float32),
            "orders": np.log1p(store.item_order_counts()[rows]).astype(np.float32)}


def substitute_rate(m: dict, chosen: list[str], data: IntentBundles) -> float:
    """Interchangeable pairs (the data's label) among the anchor and the chosen members."""
    pairs = list(itertools.combinations([m["items"][0], *chosen], 2))
    return sum(data.interchangeable(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def found_share(m: dict, chosen: list[str]) -> float:
    """The share of the hidden members found: F1 for a set of their number (a set the substitute rule left
    shorter counts its recall, below its F1: conservative for the fitted score)."""
    return len(m["hidden"] & set(chosen)) / len(m["hidden"])


def pair_features(m: dict, x: int, js: np.ndarray) -> np.ndarray:
    """:data:`serving.bundle_fit.FEATURES` of the pairs (``x`` → ``j``) for ``j`` in ``js`` (indices into ``m["items"]``)."""
    rel = m["rel"]
    order = np.argsort(-rel[x], kind="stable")
    rank = np.empty(len(order))
    rank[order] = np.arange(len(order))
    rank = np.where(rel[x] > 0, rank, len(order))
    return np.stack([rel[x, js], rel[js, x], np.log1p(rank[js]), m["same"][x, js], m["overlap"][x, js],
                     m["subst"][x, js], m["orders"][js], m["rare"][x, js]], 1)


def fit(queries: list[dict]) -> PairModel:
    x = np.concatenate([pair_features(m, 0, np.arange(1, len(m["items"]))) for m in queries])
    y = np.concatenate([[i in m["hidden"] for i in m["items"][1:]] for m in queries])
    group = np.repeat(np.arange(len(queries)), [len(m["items"]) - 1 for m in queries])
    return PairModel.fit(x, y, group)


def answer(m: dict, model: PairModel | None, pair_weight: float, threshold: float | None) -> list[str]:
    """The first set: top complements (``model`` None) or the greedy re-ranking, under the substitute rule."""
    n, size = len(m["items"]), len(m["hidden"])
    js = np.arange(1, n)
    base = model.logits(pair_features(m, 0, js)) if model is not None else -np.arange(1, n, dtype=float)
    both = None
    if model is not None and pair_weight:
        full = np.stack([model.logits(pair_features(m, x, np.arange(n))) for x in range(n)])
        both = (full + full.T) / 2
    chosen: list[int] = []
    while len(chosen) < size:
        s = base.copy()
        if chosen and both is not None:
            s += pair_weight * both[chosen][:, js].mean(0)
        s[[c - 1 for c in chosen]] = -np.inf
        if threshold is not None:
            group = [0] + chosen
            s[((m["text"][group][:, js] >= threshold) & (m["same"][group][:, js] > 0)).any(0)] = -np.inf
        if not np.isfinite(s).any():
            break
        chosen.append(int(np.argmax(s)) + 1)
    return [m["items"][c] for c in chosen]


def domain(name: str, seed: int) -> dict:
    """One domain: train at the validation cut and fit there, train at the test cut and answer the test bundles."""
    settings = load_settings(ROOT / "configs" / "default.yaml")
    encoder = settings.encoder.build(settings.paths.text_cache)
    data = IntentBundles.read(ROOT.parent / "shared" / "data" / "amazon_intent_bundles" / name)
    train_bundles, test_bundles, cut = data.split(0.2)
    vcut = train_bundles[int(len(train_bundles) * 0.8)].epoch
    sessions = [RealBundle(f"session:{s.session_id}", s.items, "", s.user_id, s.session_id, s.epoch)
                for s in data.sessions if vcut <= s.epoch < cut and len(s.items) >= 2]
    train_cfg = settings.training.model_copy(update={"seed": seed})
    found: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for when, groups in ((vcut, {"sessions": sessions, "bundles": [b for b in train_bundles if b.epoch >= vcut]}),
                         (cut, {"test": test_bundles})):
        served = serve(data, when, settings.graph, train_cfg, settings.scoring, encoder)
        known = set(served.store.items.ids)
        for group, bundles in groups.items():
            found[group] = [query_matrices(served, q) for q in bundle_queries(bundles, "one_item", known)]
    test = found["test"]
    top = [answer(m, None, 0.0, None) for m in test]
    base_f1 = np.array([found_share(m, c) for m, c in zip(test, top)])
    rows = [{"method": "top_complements", "fitted_on": "", "pair_weight": None, "threshold": None,
             "f1_top1": float(base_f1.mean()),
             "substitute_rate": float(np.mean([substitute_rate(m, c, data) for m, c in zip(test, top)]))}]
    for fitted_on in ("sessions", "bundles"):
        model = fit(found[fitted_on])
        for weight, threshold in itertools.product(PAIR_WEIGHTS, THRESHOLDS):
            if fitted_on == "bundles" and (weight, threshold) != (0.0, None):
                continue  # the other fit once, to compare what it is fitted on
            picks = [answer(m, model, weight, threshold) for m in test]
            scores = np.array([found_share(m, c) for m, c in zip(test, picks)])
            rows.append({"method": "fitted", "fitted_on": fitted_on, "pair_weight": weight, "threshold": threshold,
                         "f1_top1": float(scores.mean()),
                         "substitute_rate": float(np.mean([substitute_rate(m, c, data) for m, c in zip(test, picks)])),
                         "vs_top_complements": relative_gain([scores], [base_f1]),
                         "weights": dict(zip((*model.terms, "intercept"),
                                             np.round([*model.weights, model.intercept], 3).tolist()))})
    return {"domain": name, "seed": seed, "queries": {k: len(v) for k, v in found.items()}, "rows": rows,
            "wall_s": round(time.perf_counter() - started)}


def markdown(report: dict) -> str:
    lines = ["# A fitted bundle-fit score against top complements (Amazon intent bundles, one item given)", "",
             f"{describe(report['machine'])}. `python bench/bundle_fit.py`. See the program's docstring.", ""]
    for d in report["domains"]:
        q = d["queries"]
        lines += [f"## {d['domain']} (seed {d['seed']}; test queries {q['test']}; fitted on {q['sessions']} "
                  f"session and {q['bundles']} bundle queries of the validation period)", "",
                  "| method | fitted on | pair weight | substitute rule (cosine ≥, same category) | F1 top-1 | "
                  "vs top complements | substitute rate |", "|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            gain = gain_cell(r["vs_top_complements"]) if "vs_top_complements" in r else ""
            lines.append(f"| {r['method']} | {r['fitted_on']} | {'' if r['pair_weight'] is None else r['pair_weight']} | "
                         f"{r['threshold'] or ''} | {r['f1_top1']:.4f} | {gain} | {r['substitute_rate']:.4f} |")
        fitted = next(r for r in d["rows"] if r["fitted_on"] == "sessions")
        lines += ["", "Weights fitted on sessions (standardised features): " +
                  ", ".join(f"{k} {v:+.2f}" for k, v in fitted["weights"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", default="electronic,clothing,food")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"machine": machine(), "domains": [domain(d, args.seed) for d in args.domains.split(",")]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bundle_fit.json").write_text(json.dumps(report, indent=2, default=str))
    (OUT / "bundle_fit.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
