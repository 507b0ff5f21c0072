"""A fitted bundle-fit score: how likely item ``b`` joins an order with item ``a``, from what the view knows.

A log-linear model (standardised terms, L2 penalty) over the facts of a pair ``a → b`` that the API's
view holds (:data:`FEATURES`): ``b``'s relevance in ``a``'s published list and back, ``b``'s rank there,
whether the two share a category, the overlap of their titles' words, the worker's substitute flag,
``b``'s order count (published with its list), and how rare the rarest title word they share is in the
catalog (its inverse document frequency, as in tf-idf: two items that share a brand or a product line say
more than two that share "tea"); its terms (:data:`TERMS`) are those features and their
pairwise products, a second-order (degree-2 polynomial) logit, so that one fact may weigh differently
beside another (a shared title word within the anchor's category or across it, a rank in a list of
popular items or of rare ones). On the Food validation bundles (two seeds) the products lifted the
builder's F1 over top complements from +11.0 / +12.4 % to +13.6 / +14.9 % at a lower substitute rate
(0.070 against 0.081); ``docs/evaluation.md`` has every domain.

Fitted on orders the lists' model never saw, a validation period after its training data, and optionally
earlier such periods against earlier models' lists (:func:`fit_candidate`): for each order and each of its
items as the anchor, the anchor's listed complements are the examples and those in the order the positives. It
learns what a single relevance cannot weigh: on the Amazon intent bundles the weight of popularity is clearly
negative (a best seller tops many lists but completes few bundles) and that of a shared category or title
words positive (``bench/results/bundle_fit.md``).

The builder only ever compares candidates of one anchor's list, so the weights are fitted for that: a
conditional logit (McFadden, "Conditional logit analysis of qualitative choice behavior", 1974; the softmax
loss of listwise learning to rank): each member of an order against the whole of its anchor's list, so
what sets lists apart (an anchor with many members in its orders, a long list) cannot sway the weights. The
intercept is then fitted by pointwise logistic likelihood with those weights fixed, so
:meth:`PairModel.logits` stay log-odds (the bundle's score, the substitute penalty). On the validation
bundles of all three domains the builder's F1 is higher with these weights than with a pointwise logistic
regression's under the strict rules (docs/evaluation.md).

The bundle builder (:func:`serving.bundles.build_bundles`) ranks candidates by the fitted log-odds with the
anchors and adds, for a set, ``pair_weight`` × the mean log-odds between a candidate and the members already
chosen: members that fit each other, not only the anchor (the pairwise set score of the issue; cf. the
compatibility modelling of McAuley et al., "Inferring Networks of Substitutable and Complementary Products",
KDD 2015, which also fits a logistic model of "bought together" over pair features).
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, Field, model_validator
from scipy.optimize import minimize

from graph.store import GraphConfig, GraphStore
from serving.view import BundleView, ItemInfo
from training import job
from training.complements import BundleUpdate, ComplementScorer, ScorerConfig
from training.encoder import TextEncoder
from training.protocol import Events
from training.titles import title_words
from training.train import TrainConfig

log = logging.getLogger(__name__)

FEATURES = ("relevance", "relevance_back", "log_rank", "same_category", "title_overlap", "substitute", "log_orders",
            "rare_shared_word")
_BINARY = ("same_category", "substitute")  # their squares are themselves
_PRODUCTS = tuple((FEATURES.index(u), FEATURES.index(v))
                  for u, v in itertools.combinations_with_replacement(FEATURES, 2) if not (u == v and u in _BINARY))
TERMS = FEATURES + tuple(f"{FEATURES[i]}*{FEATURES[j]}" for i, j in _PRODUCTS)
"""The model's terms: the features and their products (second-order, as in a degree-2 polynomial logit)."""
_LEFT, _RIGHT = (np.array(k) for k in zip(*_PRODUCTS))


def expand_terms(x: np.ndarray) -> np.ndarray:
    """:data:`TERMS` of feature rows ``x`` (``... × FEATURES`` → ``... × TERMS``)."""
    return np.concatenate([x, x[..., _LEFT] * x[..., _RIGHT]], -1)


class PairModel(BaseModel):
    """Standardised logistic regression over :data:`TERMS` of :data:`FEATURES` (``pair_model`` in a model
    artifact's manifest)."""

    features: tuple[str, ...] = FEATURES
    terms: tuple[str, ...] = TERMS
    mean: list[float]
    scale: list[float]
    weights: list[float] = Field(description="per standardised term")
    intercept: float
    pairs: int = Field(description="examples it was fitted on")
    positives: int

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, group: np.ndarray, c: float = 0.1) -> PairModel:
        """Fit on ``x`` (pairs × features), labels ``y`` and each pair's list ``group`` (:class:`Examples`):
        the weights of the features' :func:`expand_terms` by conditional likelihood within the lists that hold a
        positive, then the intercept by logistic likelihood over all pairs. ``c``: inverse L2 strength, as in
        scikit-learn's ``LogisticRegression``."""
        if len(x) == 0:
            raise ValueError("no order holds an item with a published complement list: nothing to fit on")
        if y.all() or not y.any():
            raise ValueError(f"a pair model needs positive and negative pairs: {int(y.sum())} of {len(y)} positive")
        x = expand_terms(x)
        mean, scale = x.mean(0), x.std(0) + 1e-9
        z = (x - mean) / scale
        w = _conditional_logit(z, y, group, c)
        s, t = z @ w, y.astype(np.float64)

        def intercept_loss(b: np.ndarray) -> tuple[float, np.ndarray]:
            p = 1 / (1 + np.exp(-(s + b[0])))
            return float(np.logaddexp(0, s + b[0]).sum() - t @ (s + b[0])), np.array([float((p - t).sum())])

        b = minimize(intercept_loss, np.zeros(1), jac=True, method="L-BFGS-B").x[0]
        return cls(mean=mean.tolist(), scale=scale.tolist(), weights=w.tolist(), intercept=float(b),
                   pairs=len(y), positives=int(y.sum()))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Log-odds of each pair of ``x`` (``... × features``)."""
        z = (expand_terms(x) - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.weights) + self.intercept

    @model_validator(mode="after")
    def _same_terms(self) -> PairModel:
        if (tuple(self.features), tuple(self.terms)) != (FEATURES, TERMS) \
                or not len(self.mean) == len(self.scale) == len(self.weights) == len(TERMS):
            raise ValueError(f"a pair model over features {tuple(self.features)} with {len(self.weights)} weights; "
                             f"this version computes {FEATURES} and fits {len(TERMS)} terms of them (retrain the "
                             "model)")
        return self


def _conditional_logit(z: np.ndarray, y: np.ndarray, group: np.ndarray, c: float) -> np.ndarray:
    """Weights maximising Σ over positives of log softmax(z·w) within their group, minus ‖w‖² / 2c (groups
    without a positive carry no information here and are left out)."""
    keep = np.isin(group, group[y])
    z, y = z[keep], y[keep]
    g = np.unique(group[keep], return_inverse=True)[1]
    ng = int(g.max()) + 1
    positives = np.bincount(g, weights=y, minlength=ng)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = z @ w
        top = np.full(ng, -np.inf)
        np.maximum.at(top, g, s)
        e = np.exp(s - top[g])
        total = np.bincount(g, weights=e, minlength=ng)
        value = positives @ (top + np.log(total)) - s[y].sum() + 0.5 / c * (w @ w)
        return float(value), z.T @ (positives[g] * e / total[g] - y) + w / c

    return minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x


class Examples(NamedTuple):
    """Pairs for fitting: features (pairs × :data:`FEATURES`), labels, and each pair's list (one id per
    order and anchor: the candidates the builder would compare)."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        """One set of examples from several, their lists kept apart."""
        offsets = np.cumsum([0] + [int(p.group.max()) + 1 if len(p.group) else 0 for p in parts[:-1]])
        return cls(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                   np.concatenate([p.group + o for p, o in zip(parts, offsets)]))


def pair_features(view: BundleView, sources: list[str], targets: list[str]) -> np.ndarray:
    """:data:`FEATURES` of every pair ``a → b``, ``a`` in ``sources`` and ``b`` in ``targets``:
    ``len(sources) × len(targets) × 8`` (one array per call: the builder asks for tens of pairs per request).
    ``rare_shared_word``: the largest :meth:`~serving.view.BundleView.rarity` among the title words the two
    share (0 when they share none)."""
    entries = {i: view.entries.get(i) for i in (*sources, *targets)}
    rel = {i: e.relevance if e else {} for i, e in entries.items()}
    infos = {i: view.info(i) for i in entries}
    words = {i: title_words(infos[i].title) for i in entries}
    rarity = {w: view.rarity(w) for i in entries for w in words[i]}
    subs = {i: e.substitutes if e else frozenset() for i, e in entries.items()}
    orders = [math.log1p(entries[b].orders or 0) if entries[b] is not None else 0.0 for b in targets]
    rows = []
    for a in sources:
        e = entries[a]
        listed = len(e.complements) if e else 0
        rank = {c.item_id: math.log1p(r) for r, c in enumerate(e.complements)} if e else {}
        unlisted = math.log1p(listed)
        ra, wa, sa, cat = rel[a], words[a], subs[a], infos[a].category
        for b, ob in zip(targets, orders):
            wb = words[b]
            shared = wa & wb
            union = len(wa | wb) if wa and wb else 0
            rows.append((ra.get(b, 0.0), rel[b].get(a, 0.0), rank.get(b, unlisted),
                         cat is not None and cat == infos[b].category, len(shared) / union if union else 0.0,
                         b in sa or a in subs[b], ob, max((rarity[w] for w in shared), default=0.0)))
    return np.array(rows, np.float64).reshape(len(sources), len(targets), len(FEATURES))


def order_examples(view: BundleView, orders: list[list[str]]) -> Examples:
    """The examples of ``orders`` (item ids, each a set bought together) against the lists of ``view``: each
    item of an order with a published list is an anchor, its listed complements the examples (a group), those
    in the order the positives."""
    xs, ys, groups = [np.zeros((0, len(FEATURES)))], [np.zeros(0, bool)], [np.zeros(0, np.int64)]
    for order in orders:
        members = set(order)
        for a in members:
            entry = view.entries.get(a)
            listed = [c.item_id for c in entry.complements if c.item_id != a] if entry else []
            if listed:
                xs.append(pair_features(view, [a], listed)[0])
                ys.append(np.array([b in members for b in listed]))
                groups.append(np.full(len(listed), len(groups) - 1))
    return Examples(np.concatenate(xs), np.concatenate(ys), np.concatenate(groups))


def fit_on_orders(view: BundleView, orders: list[list[str]], c: float = 0.1) -> PairModel:
    """Fit on ``orders`` that the lists of ``view`` were not made from (:func:`order_examples`)."""
    return PairModel.fit(*order_examples(view, orders), c)


def published_examples(store: GraphStore, updates: list[BundleUpdate], orders: list[list[str]]) -> Examples:
    """:func:`order_examples` of the lists ``updates`` publish over ``store`` (the three parts of
    :func:`training.job.validation_lists`)."""
    view = BundleView()
    for item, it in zip(store.items.ids, store.catalog):
        if it.has_text:  # an item seen only in orders: view.info's stand-in, as in the API's view
            view.set_item(ItemInfo(item, it.title, it.category, it.price, it.in_stock))
    for u in updates:
        view.apply_update(u)
    return order_examples(view, orders)


Fold = tuple[GraphStore, list[BundleUpdate], list[list[str]]]
"""What one validation slice fits on (:func:`training.job.validation_lists`): the store before it, the lists
published over that store, and its orders."""


def flagged_examples(fold: Fold, scorer_cfg: ScorerConfig, index: dict[str, int], text: np.ndarray) -> Examples:
    """:func:`published_examples` of ``fold`` with its lists' substitute flags (a feature) as ``scorer_cfg``
    makes them over the fold's store; ``text``: the items' text embeddings, row ``index[item_id]``."""
    store, updates, orders = fold
    ids = store.items.ids
    scorer = ComplementScorer(store, scorer_cfg)
    rows = np.array([r for r in store.text_rows().tolist() if ids[r] in index], np.int64)
    scorer.set_text(rows, text[[index[ids[r]] for r in rows.tolist()]])
    return published_examples(store, [u.model_copy(update={"substitutes": scorer.substitutes(u.item_id)})
                                      for u in updates], orders)


def refit(folds: list[Fold], scorer_cfg: ScorerConfig, index: dict[str, int], text: np.ndarray) -> PairModel:
    """The pair model that a run under ``scorer_cfg`` would fit on the same ``folds`` (kept by
    :func:`fit_candidate`): their substitute flags made under it (:func:`flagged_examples`). A model fitted
    under the default threshold and read under another gave the builder 0.7–2 points less F1 gain at thresholds
    0.9 and above on the Clothing and Food validation bundles (seed 0; the same picks), so
    ``bench/bundle_rules.py`` refits per threshold."""
    return PairModel.fit(*Examples.concat([flagged_examples(f, scorer_cfg, index, text) for f in folds]))


def fit_candidate(cand: job.Candidate, events: Events, train_cfg: TrainConfig, graph_cfg: GraphConfig,
                  encoder: TextEncoder, scorer_cfg: ScorerConfig, folds_out: list[Fold] | None = None
                  ) -> PairModel | None:
    """The pair model of a freshly trained candidate (``bundlegnn train``, ``evaluate --task bundle``), fitted
    on the lists it publishes over the store before its validation orders and those orders
    (:func:`training.job.validation_lists`), and with ``training.pair_folds`` > 1 on those of as many more
    models trained on earlier events (:func:`training.job.earlier_folds`: each adds a slice of orders no list
    was made from; three folds are what ``bench/bundle_rules.py`` and the tuned lines of ``make bench`` fit,
    ``docs/evaluation.md``).
    Releases the candidate's fit store. None, with the reason logged, when there is nothing to fit on (no
    decoder, no validation orders, or no order item among the lists): the builder then ranks by relevance.
    ``folds_out``: a list that receives every fold (and so holds their stores), for a caller that refits under
    other scoring settings (``bench/bundle_rules.py``: the substitute flags of each threshold it measures)."""
    first = job.validation_lists(cand, scorer_cfg)
    examples = [published_examples(*first)]
    job.release_fit(cand)
    if folds_out is not None:
        folds_out.append(first)
    del first
    if len(examples[0].y):
        for fold in job.earlier_folds(events, cand, train_cfg.pair_folds - 1, train_cfg, graph_cfg, encoder,
                                      scorer_cfg):
            examples.append(published_examples(*fold))
            if folds_out is not None:
                folds_out.append(fold)
            del fold  # its store: not held while the next fold trains (unless folds_out keeps it)
    try:
        return PairModel.fit(*Examples.concat(examples))
    except ValueError as exc:
        log.warning("no pair model for the bundle builder (%s): bundles are ranked by relevance", exc)
        return None
