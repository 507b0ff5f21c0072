"""``bundlegnn evaluate --task bundle``: the bundles the API builds, judged against bundles people made.

On each domain of the Amazon intent bundles (:mod:`training.intent_bundles`)
the bundles are split by time; the model trains, as ``bundlegnn train``
does, on the sessions and the training bundles before the cut, and every
item's complement list is computed as the stream worker publishes it
(:class:`~training.complements.ComplementScorer` over the model's
artifact). Then, for each test bundle, the API's builder
(:func:`serving.bundles.build_bundles`, the same function and rules) is
asked for ``k`` bundles of the real bundle's size in two settings:

* ``one_item``: one member is given (each member in turn), the others are
  to be found;
* ``all_but_one``: every member but one is given (each member in turn), as
  a cart to complete.

Baselines answer the same queries with ranked lists cut into ``k``
consecutive sets of the same size: ``top_complements`` (the anchors' own
published complement lists, best relevance first: the model without set
scoring), ``cooccurrence`` (the worker's no-model lists: co-purchase cosine,
text-borrowed for items without orders), ``text`` (nearest titles) and
``popularity``.

Metrics of a query: precision, recall and F1 of the found members against
the real ones, for the first set (``top1``) and the best of the ``k``
(``best``); ``hit`` (the first set holds at least one real member);
``substitute_rate`` (pairs of the first set, anchors included, that are
interchangeable: same category leaf, near-identical titles — the data's
label, :meth:`~training.intent_bundles.IntentBundles.interchangeable`);
``category_diversity`` (distinct category leaves over items, first set and
anchors). Over seeds, relative gains of ``builder`` over every baseline with
the hierarchical bootstrap intervals of the item evaluation
(:func:`training.protocol.relative_gain`).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from graph.events import ItemUpserted
from graph.store import GraphConfig, GraphStore
from serving.bundle_fit import Fold, PairModel, fit_candidate
from serving.bundles import BundleRules, build_bundles, label
from serving.view import BundleView
from training import job
from training.artifact import load_artifact
from training.complements import ComplementScorer, ScorerConfig, unit
from training.encoder import TextEncoder
from training.intent_bundles import IntentBundles, RealBundle
from training.evaluation import gain_cell
from training.protocol import relative_gain
from training.train import TrainConfig

SETTINGS = ("one_item", "all_but_one")
METRICS = ("f1_top1", "precision_top1", "recall_top1", "f1_best", "precision_best", "recall_best", "hit",
           "substitute_rate", "category_diversity")


@dataclass(frozen=True)
class BundleQuery:
    bundle: RealBundle
    anchors: tuple[str, ...]
    hidden: tuple[str, ...]  # the members to find


def bundle_queries(bundles: list[RealBundle], setting: str, known: set[str]) -> list[BundleQuery]:
    """Every query of ``setting`` over ``bundles`` whose members are all ``known`` items (in the catalog or in
    a training order: an item nobody can know is no question)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    out = []
    for b in bundles:
        if len(b.items) < 2 or not all(i in known for i in b.items):
            continue
        for k, member in enumerate(b.items):
            rest = b.items[:k] + b.items[k + 1:]
            out.append(BundleQuery(b, (member,), rest) if setting == "one_item" else BundleQuery(b, rest, (member,)))
    return out


Method = Callable[[BundleQuery, int], list[list[str]]]
"""``k`` candidate sets (item ids) of ``len(query.hidden)`` items each, best first."""


def _sets(ranked: Iterator[str] | list[str], query: BundleQuery, k: int) -> list[list[str]]:
    """The first ``k × size`` items of a ranked list not among the anchors, cut into ``k`` consecutive sets."""
    size, anchors = len(query.hidden), set(query.anchors)
    picked = list(itertools.islice((i for i in ranked if i not in anchors), k * size))
    return [picked[j:j + size] for j in range(0, len(picked), size)]


def _merged(lists: list[dict[str, float]]) -> list[str]:
    """Items of several anchors' scored lists, highest sum over the anchors first (ties: item id), as the
    builder orders its candidates."""
    total: dict[str, float] = {}
    for scores in lists:
        for item, s in scores.items():
            total[item] = total.get(item, 0.0) + s
    return sorted(total, key=lambda i: (-total[i], i))


@dataclass
class Served:
    """What one trained model serves on a domain: the API's view, the store it was built from, the text
    embeddings of the store's items (zero rows: no text), the training summary and the builder's pair model
    fitted on the candidate's validation orders (None: none could be fitted)."""

    view: BundleView
    store: GraphStore
    text: np.ndarray
    summary: dict
    fit: PairModel | None = None


def serve(data: IntentBundles, cut: float, graph_cfg: GraphConfig, train_cfg: TrainConfig, scorer_cfg: ScorerConfig,
          encoder: TextEncoder, folds_out: list[Fold] | None = None) -> Served:
    """Train as ``bundlegnn train`` does on the events before ``cut``; publish every item's list as the worker
    would; return the API's view of them. ``folds_out``: as in :func:`~serving.bundle_fit.fit_candidate`."""
    events = data.events(cut)
    cand = job.fit(events, train_cfg, graph_cfg, encoder)
    fit = fit_candidate(cand, events, train_cfg, graph_cfg, encoder, scorer_cfg, folds_out)
    store = job.full_store(cand, events, graph_cfg)
    with tempfile.TemporaryDirectory() as models:
        path, summary = job.save(cand, store, train_cfg, encoder, models, f"intent-{data.domain}")
        artifact = load_artifact(path)
    scorer = ComplementScorer(store, scorer_cfg)
    rows = store.text_rows()
    text = np.zeros((store.num_items, encoder.dim), np.float32)
    text[rows] = encoder.encode([store.catalog[r].text for r in rows], progress=False)
    scorer.set_text(rows, text[rows])
    scorer.set_views(artifact.version, artifact.item_ids, artifact.src, artifact.dst, artifact.prior,
                     artifact.model.temperature, artifact.decoder_rows)
    view = BundleView()
    for e in events:
        if isinstance(e, ItemUpserted):
            view.upsert_item(e)
    for item in store.items.ids:
        view.apply_update(scorer.update(item))
    return Served(view, store, text, summary, fit)


def methods(served: Served, rules: BundleRules, scorer_cfg: ScorerConfig) -> dict[str, Method]:
    """The builder (with the served pair model, if any, and without it) and the baselines over one served
    model."""
    view, store, fit = served.view, served.store, served.fit
    ids = store.items.ids
    no_model = ComplementScorer(store, scorer_cfg)
    rows = np.flatnonzero(served.text.any(1))
    no_model.set_text(rows, served.text[rows])
    popular = [ids[r] for r in np.argsort(-store.item_order_counts(), kind="stable").tolist()]
    text = unit(served.text)

    def builder(q: BundleQuery, k: int) -> list[list[str]]:
        found = build_bundles(view, list(q.anchors), k, len(q.hidden), rules, include_anchor=False, fit=fit)
        return [[m.item_id for m in b.items] for b in found]

    def builder_unfitted(q: BundleQuery, k: int) -> list[list[str]]:
        found = build_bundles(view, list(q.anchors), k, len(q.hidden), rules, include_anchor=False)
        return [[m.item_id for m in b.items] for b in found]

    def top_complements(q: BundleQuery, k: int) -> list[list[str]]:
        lists = [view.entries[a].relevance if a in view.entries else {} for a in q.anchors]
        return _sets(_merged(lists), q, k)

    def cooccurrence(q: BundleQuery, k: int) -> list[list[str]]:
        return _sets(_merged([{c.item_id: c.score for c in no_model.complements(a)} for a in q.anchors]), q, k)

    def text_similar(q: BundleQuery, k: int) -> list[list[str]]:
        at = [store.items.index[a] for a in q.anchors if a in store.items]
        if not at or not text[at].any():
            return _sets(popular, q, k)  # an anchor without text: nothing to be similar to
        sims = text @ text[at].mean(0)
        order = np.argsort(-sims, kind="stable")[: k * len(q.hidden) + len(q.anchors) + 1]
        return _sets([ids[r] for r in order.tolist()], q, k)

    def popularity(q: BundleQuery, k: int) -> list[list[str]]:
        return _sets(popular, q, k)

    return {"builder": builder, **({"builder_unfitted": builder_unfitted} if fit is not None else {}),
            "top_complements": top_complements, "cooccurrence": cooccurrence,
            "text": text_similar, "popularity": popularity}


def scores(query: BundleQuery, sets: list[list[str]], data: IntentBundles) -> dict[str, float]:
    """The metrics (:data:`METRICS`) of one query's answer."""
    real = set(query.hidden)

    def prf(found: list[str]) -> tuple[float, float, float]:
        hit = len(real.intersection(found))
        p, r = (hit / len(found) if found else 0.0), hit / len(real)
        return p, r, (2 * p * r / (p + r) if hit else 0.0)

    each = [prf(s) for s in sets] or [(0.0, 0.0, 0.0)]
    p1, r1, f1 = each[0]
    pb, rb, fb = max(each, key=lambda x: x[2])
    first = list(query.anchors) + (sets[0] if sets else [])
    pairs = list(itertools.combinations(first, 2))
    leaves = [data.leaf(i) or f"?{i}" for i in first]
    return {"f1_top1": f1, "precision_top1": p1, "recall_top1": r1, "f1_best": fb, "precision_best": pb,
            "recall_best": rb, "hit": float(p1 > 0),
            "substitute_rate": sum(data.interchangeable(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0,
            "category_diversity": len(set(leaves)) / len(leaves)}


def evaluate_domain(data: IntentBundles, graph_cfg: GraphConfig, train_cfg: TrainConfig, scorer_cfg: ScorerConfig,
                    rules: BundleRules, encoder: TextEncoder, seed: int = 0, test_frac: float = 0.2,
                    k: int = 5) -> dict:
    """One seed on one domain: ``{"protocol", "settings": {setting: {method: {metric: mean}}}, "per_query":
    {setting: {method: {metric: [value per query]}}}, "real_bundles": the test bundles' own substitute rate
    and category diversity, "labels" (:func:`labels`), "example" (:func:`example`), "substitutes"
    (:func:`substitute_detectors`), "timings"}``."""
    started = time.perf_counter()
    train_bundles, test_bundles, cut = data.split(test_frac)
    served = serve(data, cut, graph_cfg, train_cfg.model_copy(update={"seed": seed}), scorer_cfg, encoder)
    trained_s = time.perf_counter() - started
    known = set(served.store.items.ids)
    fit = served.fit
    report: dict = {"settings": {}, "per_query": {}, "timings": {"train_s": round(trained_s, 1)},
                    "pair_model": fit.model_dump() if fit is not None else None}
    named: list[tuple[BundleQuery, list[str]]] = []
    answering = methods(served, rules, scorer_cfg)
    for setting in SETTINGS:
        queries = bundle_queries(test_bundles, setting, known)
        report["settings"][setting], report["per_query"][setting] = {}, {}
        for name, method in answering.items():
            began = time.perf_counter()
            answers = [method(q, k) for q in queries]
            if setting == "one_item" and name == "builder":
                named = [(q, a[0] if a else []) for q, a in zip(queries, answers)]
            rows = [scores(q, a, data) for q, a in zip(queries, answers)]
            per = {m: [r[m] for r in rows] for m in METRICS}
            report["per_query"][setting][name] = per
            report["settings"][setting][name] = {m: float(np.mean(v)) if v else float("nan") for m, v in per.items()}
            report["timings"][f"{setting}_{name}_s"] = round(time.perf_counter() - began, 1)
    report["labels"] = labels(named, served.view, encoder)
    report["example"] = example(named, served.view, rules, data, fit)
    report["substitutes"] = substitute_detectors(data, served.store, served.text)
    whole = [scores(BundleQuery(b, b.items[:1], b.items[1:]), [list(b.items[1:])], data) for b in test_bundles]
    report["real_bundles"] = {m: float(np.mean([w[m] for w in whole])) for m in ("substitute_rate", "category_diversity")}
    report["protocol"] = {"domain": data.domain, "seed": seed, "test_frac": test_frac, "k": k,
                          "cut": cut, "train_bundles": len(train_bundles), "test_bundles": len(test_bundles),
                          "train_sessions": sum(1 for s in data.sessions if s.epoch < cut),
                          "queries": {s: len(report["per_query"][s]["builder"]["hit"]) for s in SETTINGS},
                          "items": served.store.num_items, "gnn_weight": served.summary.get("gnn_weight"),
                          "decoder": served.summary.get("decoder")}
    return report


def labels(named: list[tuple[BundleQuery, list[str]]], view: BundleView, encoder: TextEncoder) -> dict:
    """How close the builder's bundle labels come to the intents people wrote: the mean cosine of their text
    embeddings for the label of the first bundle built for each ``one_item`` query, against the anchor's own
    title in its place (the baseline) and the label of the real bundle's own items (what a perfect bundle
    would be called); per query, for intervals."""
    built, title, real = [], [], []
    for q, members in named:
        intent = q.bundle.intent or ""
        built.append((label([view.info(i) for i in (*q.anchors, *members)]) or view.info(q.anchors[0]).title, intent))
        title.append((view.info(q.anchors[0]).title, intent))
        real.append((label([view.info(i) for i in q.bundle.items]) or view.info(q.anchors[0]).title, intent))

    def cosines(pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        a = encoder.encode([x for x, _ in pairs], progress=False)
        b = encoder.encode([y for _, y in pairs], progress=False)
        return (a * b).sum(1).astype(float).tolist()

    return {"builder_label": cosines(built), "anchor_title": cosines(title), "real_bundle_label": cosines(real),
            "examples": [{"intent": i, "label": lab, "anchor_title": t} for (lab, i), (t, _) in
                         list(zip(built, title))[:10]]}


def example(named: list[tuple[BundleQuery, list[str]]], view: BundleView, rules: BundleRules,
            data: IntentBundles, fit: PairModel | None = None) -> dict | None:
    """One real test bundle of three or more items beside the bundle the API builds for one of its items (the
    first query whose first bundle finds the most real members): for people to read."""
    found = max(((q, members) for q, members in named if len(q.bundle.items) >= 3 and set(members) & set(q.hidden)),
                key=lambda qm: len(set(qm[1]) & set(qm[0].hidden)), default=None)
    if found is None:
        return None
    best = found[0]
    built = build_bundles(view, list(best.anchors), 1, len(best.hidden), rules, fit=fit)[0]
    return {"intent": best.bundle.intent, "bundle_id": best.bundle.bundle_id, "anchor": best.anchors[0],
            "real": [{"item_id": i, "title": data.titles.get(i, i), "category": data.leaf(i)}
                     for i in (*best.anchors, *best.hidden)],
            "built": built.model_dump()}


DETECTOR_THRESHOLDS = (0.75, 0.8, 0.85, 0.9, 0.95)


def substitute_detectors(data: IntentBundles, store: GraphStore, text: np.ndarray) -> dict:
    """Precision and recall of substitute rules on labelled pairs of one domain.

    Labels, from the data alone: *substitutes* are the pairs of titled items that are interchangeable (same
    category leaf, title word sets with Jaccard ≥ 0.5: :meth:`IntentBundles.interchangeable`); *not
    substitutes* are the other pairs of items people put in one bundle. Rules: a text-cosine threshold alone,
    and the same threshold where both items are in the same category (``scoring.substitute_same_category``,
    the detector the worker publishes with), at each of :data:`DETECTOR_THRESHOLDS`. Both also require that the
    two were never bought together, which these pairs do not test."""
    groups: dict[str, list[str]] = {}
    for item in data.titles:
        if (leaf := data.leaf(item)) is not None and item in store.items:
            groups.setdefault(leaf, []).append(item)
    positive = {tuple(sorted(p)) for g in groups.values() for p in itertools.combinations(g, 2)
                if data.interchangeable(*p)}
    negative = {tuple(sorted(p)) for b in data.bundles for p in itertools.combinations(b.items, 2)
                if all(i in store.items for i in p)} - positive
    pairs = sorted(positive) + sorted(negative)
    truth = np.array([True] * len(positive) + [False] * len(negative))
    rows = np.array([[store.items.index[a], store.items.index[b]] for a, b in pairs], np.int64).reshape(-1, 2)
    unit_text = unit(text)
    cos = (unit_text[rows[:, 0]] * unit_text[rows[:, 1]]).sum(1)
    same = np.array([data.leaf(a) == data.leaf(b) for a, b in pairs], bool)

    def measured(flag: np.ndarray) -> dict[str, float]:
        tp = int((flag & truth).sum())
        p, r = tp / max(int(flag.sum()), 1), tp / max(int(truth.sum()), 1)
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if tp else 0.0}

    return {"substitute_pairs": len(positive), "bundle_pairs": len(negative),
            "text": {str(t): measured(cos >= t) for t in DETECTOR_THRESHOLDS},
            "text_same_category": {str(t): measured((cos >= t) & same) for t in DETECTOR_THRESHOLDS}}


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of every metric, and the builder's relative gain over every baseline on F1 (top-1 and
    best of k), pooled over seeds with its 95 % interval."""
    out: dict = {"domain": runs[0]["protocol"]["domain"], "seeds": [r["protocol"]["seed"] for r in runs],
                 "protocol": {k: v for k, v in runs[0]["protocol"].items() if k != "seed"},
                 "real_bundles": runs[0]["real_bundles"], "settings": {}, "comparisons": {}}
    for setting in SETTINGS:
        names = list(runs[0]["settings"][setting])
        out["settings"][setting] = {n: {m: float(np.mean([r["settings"][setting][n][m] for r in runs]))
                                        for m in METRICS} for n in names}
        out["comparisons"][setting] = {
            f"builder vs {n}": {m: relative_gain([np.array(r["per_query"][setting]["builder"][m]) for r in runs],
                                                 [np.array(r["per_query"][setting][n][m]) for r in runs])
                                for m in ("f1_top1", "f1_best")}
            for n in names if n != "builder"}
    lab = [r["labels"] for r in runs]
    out["labels"] = {name: float(np.mean([x for r in lab for x in r[name]])) for name in
                     ("builder_label", "anchor_title", "real_bundle_label")}
    out["labels"]["builder_label vs anchor_title"] = relative_gain(
        [np.array(r["builder_label"]) for r in lab], [np.array(r["anchor_title"]) for r in lab])
    out["labels"]["examples"] = lab[0]["examples"]
    out["pair_models"] = [r["pair_model"] for r in runs]
    out["substitutes"] = runs[0]["substitutes"]  # text embeddings and labels do not depend on the seed
    out["example"] = runs[0]["example"]
    return out


def markdown(summaries: list[dict]) -> str:
    """Per domain and setting: every method's metrics, then the builder's gains."""
    lines: list[str] = []
    for s in summaries:
        p = s["protocol"]
        lines.append(f"\n## {s['domain']}: {p['test_bundles']} test bundles after {time.strftime('%Y-%m-%d', time.gmtime(p['cut']))}, "
                     f"{p['train_bundles']} training bundles and {p['train_sessions']} sessions before; seeds "
                     f"{s['seeds']}; k = {p['k']}\n")
        rb = s["real_bundles"]
        lines.append(f"Real test bundles: substitute rate {rb['substitute_rate']:.3f}, category diversity "
                     f"{rb['category_diversity']:.3f}.\n")
        for setting, table in s["settings"].items():
            lines += [f"\n{setting} ({p['queries'][setting]} queries)\n",
                      "| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
            lines += [f"| {n} | " + " | ".join(f"{m[x]:.4f}" for x in METRICS) + " |" for n, m in table.items()]
            lines += ["", "| comparison | f1_top1 | f1_best |", "|---|---|---|"]
            for name, g in s["comparisons"][setting].items():
                lines.append(f"| {name} | " + " | ".join(gain_cell(g[m]) for m in ("f1_top1", "f1_best")) + " |")
        fitted = [m for m in s.get("pair_models", []) if m]
        if fitted:
            mean = np.mean([m["weights"] for m in fitted], 0)
            names = fitted[0].get("terms", fitted[0]["features"])
            lines.append("\nThe builder's pair model, fitted on each seed's validation orders (and, with "
                         f"training.pair_folds > 1, earlier folds' orders; {fitted[0]['pairs']} "
                         f"pairs, {fitted[0]['positives']} positive, seed {s['seeds'][0]}); mean weights of the "
                         "standardised terms, those of 0.05 or more: "
                         + ", ".join(f"{k} {w:+.2f}" for k, w in zip(names, mean) if abs(w) >= 0.05)
                         + f" (of {len(names)} terms).\n")
        lab = s["labels"]
        lines += [f"\nLabels (cosine of text embeddings with the written intent, one_item queries): builder's label "
                  f"{lab['builder_label']:.3f}, anchor's title {lab['anchor_title']:.3f} (label vs title "
                  f"{gain_cell(lab['builder_label vs anchor_title'])}), label of the real bundle's items "
                  f"{lab['real_bundle_label']:.3f}.\n", "| intent | label | anchor's title |", "|---|---|---|"]
        lines += [f"| {e['intent']} | {e['label']} | {e['anchor_title'][:80]} |" for e in lab["examples"]]
        if (ex := s["example"]) is not None:
            lines += [f"\nA real test bundle (intent \"{ex['intent']}\") and the bundle the API builds for "
                      f"`{ex['anchor']}`, labelled \"{ex['built']['label']}\":\n", "| real bundle | built by the API | why |",
                      "|---|---|---|"]
            built = ex["built"]["items"]
            for k in range(max(len(ex["real"]), len(built))):
                r = ex["real"][k]["title"][:70] if k < len(ex["real"]) else ""
                b = built[k]["title"][:70] if k < len(built) else ""
                lines.append(f"| {r} | {b} | {built[k]['why'][:120] if k < len(built) else ''} |")
        sub = s["substitutes"]
        lines += [f"\nSubstitute detectors on {sub['substitute_pairs']} interchangeable pairs against "
                  f"{sub['bundle_pairs']} other pairs of real bundles (precision / recall):\n",
                  "| text cosine ≥ | " + " | ".join(sub["text"]) + " |", "|---" * (len(sub["text"]) + 1) + "|"]
        for rule, name in (("text", "text alone"), ("text_same_category", "text, same category")):
            lines.append(f"| {name} | " + " | ".join(f"{m['precision']:.3f} / {m['recall']:.3f}"
                                                     for m in sub[rule].values()) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"

