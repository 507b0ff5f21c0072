"""The builder's fitted pair score: the conditional fit, the pair features read from the view, and the builder
ranking by it under the same rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from serving.bundle_fit import (FEATURES, TERMS, Examples, PairModel, expand_terms, fit_on_orders, order_examples,
                                pair_features)
from serving.bundles import Bundle, BundleRules, build_bundles
from serving.view import BundleView
from tests.test_serving import NOW, catalog
from training.complements import BundleUpdate, Complement


def publish(view: BundleView, anchor: str, ranked: list[tuple[str, float]], orders: int,
            substitutes: tuple[str, ...] = ()) -> None:
    comps = [Complement(item_id=i, score=s, orders=1, source="co-purchase") for i, s in ranked]
    view.apply_update(BundleUpdate(item_id=anchor, complements=comps, model_version=None, graph_version=1,
                                   updated_at=NOW, substitutes=list(substitutes), orders=orders))


@pytest.fixture
def view() -> BundleView:
    """Anchor A (a tent) lists P (a best seller) first, then its pegs G, a lamp L and T, a near twin of G."""
    v = BundleView()
    for k, title, cat in [("A", "trail tent two person", "Tents"), ("P", "gift card", "Cards"),
                          ("G", "trail tent pegs", "Tent parts"), ("L", "camping lamp", "Lamps"),
                          ("T", "trail tent pegs steel", "Tent parts")]:
        catalog(v, k, title, price=5.0, category=cat)
    publish(v, "A", [("P", 1.0), ("G", 0.5), ("L", 0.4), ("T", 0.3)], orders=40)
    publish(v, "P", [("L", 1.0), ("A", 0.2)], orders=5000)
    publish(v, "G", [("A", 1.0), ("L", 0.5)], orders=30, substitutes=("T",))
    publish(v, "L", [("G", 1.0), ("A", 0.8)], orders=25)
    publish(v, "T", [("A", 1.0)], orders=3)
    return v


def test_pair_features_read_from_the_view(view: BundleView) -> None:
    x = pair_features(view, ["A", "G"], ["P", "G", "T"])
    assert x.shape == (2, 3, len(FEATURES))
    a_p, a_g, a_t = x[0]
    assert list(a_p) == pytest.approx([1.0, 0.2, 0.0, 0.0, 0.0, 0.0, math.log1p(5000), 0.0])
    # trail, tent: each in 3 of the 5 titles
    assert list(a_g) == pytest.approx([0.5, 1.0, math.log1p(1), 0.0, 2 / 5, 0.0, math.log1p(30), math.log(6 / 4)])
    assert x[1, 2, 5] == 1.0 and x[1, 2, 3] == 1.0  # G and T: published substitutes, one category
    assert x[1, 2, 7] == pytest.approx(math.log(6 / 3))  # and they share "pegs", in 2 of the 5 titles
    assert a_t[2] == pytest.approx(math.log1p(3))  # rank 3 in A's list
    assert x[1, 0, 2] == pytest.approx(math.log1p(2)) and x[1, 0, 1] == 0.0  # P not in G's list (the rank after its last), nor G in P's


def test_a_renamed_item_moves_the_word_counts_rarity_reads(view: BundleView) -> None:
    assert view.word_items["pegs"] == 2 and view.rarity("pegs") == pytest.approx(math.log(6 / 3))
    catalog(view, "T", "steel stakes", price=5.0, category="Tent parts")
    catalog(view, "T", "steel stakes", price=6.0, category="Tent parts")  # the same title again: counted once
    assert view.word_items["pegs"] == 1 and view.word_items["stakes"] == 1 and view.word_items["trail"] == 2
    assert view.rarity("pegs") == pytest.approx(math.log(6 / 2)) and view.rarity("never") == pytest.approx(math.log(6))
    assert pair_features(view, ["G"], ["T"])[0, 0, 7] == 0.0  # no shared word left


def _one_member_per_list(logits: np.ndarray, lists: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Labels: one member per list of ``size`` candidates, drawn with probability ∝ exp(logit)."""
    p = np.exp(logits.reshape(lists, size))
    p /= p.sum(1, keepdims=True)
    y = np.zeros((lists, size), bool)
    y[np.arange(lists), [rng.choice(size, p=row) for row in p]] = True
    return y.ravel()


def test_fit_finds_the_weights_and_the_intercept_and_round_trips() -> None:
    """2,000 lists of 10 candidates, one member each drawn by a softmax over 2 x₀ − 3 x₆: the conditional fit
    finds those weights (and none for the products of features), and the intercept fitted after them makes the
    log-odds calibrated (as many members expected as there are)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, len(FEATURES)))
    y = _one_member_per_list(2 * x[:, 0] - 3 * x[:, 6], 2000, 10, rng)
    group = np.repeat(np.arange(2000), 10)
    model = PairModel.fit(x, y, group, c=10.0)
    assert model.weights[0] == pytest.approx(2, rel=0.2) and model.weights[6] == pytest.approx(-3, rel=0.2)
    assert all(abs(w) < 0.2 for w in model.weights[1:6] + model.weights[7:]) and len(model.weights) == len(TERMS)
    p = 1 / (1 + np.exp(-model.logits(x)))
    assert p.sum() == pytest.approx(y.sum(), rel=1e-4)  # the intercept's score equation
    assert (model.pairs, model.positives) == (20_000, 2000)
    again = PairModel.model_validate_json(model.model_dump_json())  # as the API reads it from a manifest
    assert np.allclose(again.logits(x), model.logits(x))
    with pytest.raises(ValueError, match="this version computes"):
        PairModel.model_validate({**model.model_dump(), "features": ["relevance"]})
    with pytest.raises(ValueError, match="positive and negative"):
        PairModel.fit(x[:10], np.ones(10, bool), group[:10])


def test_second_order_terms_fit_what_one_feature_does_only_beside_another() -> None:
    """Relevance that ranks only among candidates of the anchor's category (x₀ · x₃): the model's product term
    carries it, where a weight per feature could not; a manifest of a model without the terms is refused."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20_000, len(FEATURES)))
    x[:, 3] = rng.random(20_000) < 0.5  # same_category
    assert np.allclose(expand_terms(x[:2])[:, TERMS.index("relevance*same_category")], x[:2, 0] * x[:2, 3])
    y = _one_member_per_list(3 * x[:, 0] * x[:, 3], 2000, 10, rng)
    model = PairModel.fit(x, y, np.repeat(np.arange(2000), 10), c=10.0)
    w = dict(zip(TERMS, model.weights))
    assert w["relevance*same_category"] > 1 and abs(w["relevance"]) < 0.3
    logits = model.logits(x).reshape(2000, 10)
    assert (logits.argmax(1) == y.reshape(2000, 10).argmax(1)).mean() > 0.5  # a random pick: 0.1
    old = {**model.model_dump(), "terms": FEATURES, "mean": [0.0] * 8, "scale": [1.0] * 8, "weights": [0.0] * 8}
    with pytest.raises(ValueError, match="retrain"):
        PairModel.model_validate(old)


def test_the_weights_rank_within_lists_whatever_sets_lists_apart() -> None:
    """Whether a list holds a member at all (an anchor whose orders hold many items) predicts membership
    pointwise but ranks nothing within a list: the conditional fit gives the feature that marks such lists
    (and its square) about no weight, where a pointwise logistic regression gives it a large one, and finds
    the slope of the feature that ranks where the members are; lists without a member do not move the
    weights."""
    rng = np.random.default_rng(1)
    lists, size = 600, 8
    group = np.repeat(np.arange(lists), size)
    busy = rng.random(lists) < 0.5
    x = np.zeros((lists * size, len(FEATURES)))
    x[:, 0] = rng.normal(size=lists * size)  # ranks within a list
    x[:, 1] = np.repeat(busy, size) + rng.normal(scale=0.05, size=lists * size)  # marks a list, ranks nothing
    has_member = np.repeat(rng.random(lists) < np.where(busy, 0.9, 0.1), size)
    y = _one_member_per_list(1.5 * x[:, 0], lists, size, rng) & has_member
    model = PairModel.fit(x, y, group)
    w = dict(zip(TERMS, model.weights))
    assert abs(w["relevance_back"]) < 0.1 and abs(w["relevance_back*relevance_back"]) < 0.1
    busy_row = np.zeros((2, len(FEATURES)))
    busy_row[:, 1], busy_row[1, 0] = 1.0, 1.0  # a candidate of a busy list, and one with x₀ higher by 1
    assert np.diff(model.logits(busy_row))[0] == pytest.approx(1.5, rel=0.2)
    z = np.hstack([(x - x.mean(0)) / (x.std(0) + 1e-9), np.ones((len(x), 1))])

    def pointwise(w: np.ndarray) -> tuple[float, np.ndarray]:  # logistic likelihood, all pairs alike
        return np.logaddexp(0, z @ w).sum() - y @ (z @ w), z.T @ (1 / (1 + np.exp(-z @ w)) - y)

    assert minimize(pointwise, np.zeros(z.shape[1]), jac=True).x[1] > 1
    x[~has_member, 0] *= -1  # what lists without a member hold
    assert PairModel.fit(x, y, group).weights == pytest.approx(model.weights, rel=1e-3)  # up to the standardisation


def test_examples_of_orders_group_each_anchor_s_list(view: BundleView) -> None:
    got = order_examples(view, [["A", "G"], ["G", "L"]])
    # A's list (P, G, L, T) and G's (A, L) in the first order; G's (A, L) and L's (G, A) in the second: one
    # member each
    assert np.array_equal(got.group, np.sort(got.group)) and sorted(np.bincount(got.group)) == [2, 2, 2, 4]
    assert np.bincount(got.group, weights=got.y).tolist() == [1, 1, 1, 1]
    both = Examples.concat([got, got])
    assert both.group.tolist() == got.group.tolist() + (got.group + 4).tolist() and len(both.x) == 20


def test_fit_on_orders_learns_that_a_best_seller_completes_few_orders(view: BundleView) -> None:
    orders = [["A", "G"], ["A", "L"], ["A", "G", "L"], ["G", "L"], ["P", "L"]] * 4
    model = fit_on_orders(view, orders)
    assert model.weights[FEATURES.index("log_orders")] < 0
    logit = model.logits(pair_features(view, ["A"], ["P", "G"]))[0]
    assert logit[1] > logit[0]
    with pytest.raises(ValueError, match="no order holds"):
        fit_on_orders(view, [["X", "Y"]])


def _model(**weights: float) -> PairModel:
    """A pair model with the given weights on the raw terms (the others 0)."""
    return PairModel(mean=[0.0] * len(TERMS), scale=[1.0] * len(TERMS),
                     weights=[weights.get(t, 0.0) for t in TERMS], intercept=0.0, pairs=1, positives=1)


SPECIFIC = {"relevance": 2.0, "log_rank": -1.0, "log_orders": -0.5}  # high in the list, not a best seller


def test_builder_ranks_by_the_fitted_score_under_the_same_rules(view: BundleView) -> None:
    rules = BundleRules(max_per_category=None)
    by_relevance = build_bundles(view, ["A"], 1, 2, rules)[0]
    assert [m.item_id for m in by_relevance.items] == ["A", "P", "L"]  # the best seller first
    model = _model(**SPECIFIC)
    fitted = build_bundles(view, ["A"], 3, 2, rules, fit=model)
    first = [m.item_id for m in fitted[0].items]
    assert first[0] == "A" and set(first[1:]) == {"G", "L"}  # not the best seller; pegs and lamp fit each other
    assert all(not {"G", "T"} <= {m.item_id for m in b.items} for b in fitted)  # substitutes never together
    assert 0 < fitted[0].score < 1 and [b.score for b in fitted] == sorted((b.score for b in fitted), reverse=True)
    assert build_bundles(view, ["A"], 1, 2, rules.model_copy(update={"in_stock_only": True}), fit=model)[0].why


def test_the_first_bundle_does_not_depend_on_k() -> None:
    """X's best complement B goes with nothing else; C and D, next in X's list, go with each other: the bundle
    grown from C scores higher than the one grown from B, and a request for one bundle gets it too."""
    v = BundleView()
    for k in "XBCD":
        catalog(v, k, f"item {k}", price=1.0, category=f"cat {k}")
    publish(v, "X", [("B", 1.0), ("C", 0.9), ("D", 0.85)], orders=10)
    publish(v, "C", [("D", 1.0)], orders=10)
    publish(v, "D", [("C", 1.0)], orders=10)
    rules = BundleRules(max_per_category=None)
    firsts = [[m.item_id for m in build_bundles(v, ["X"], k, 2, rules)[0].items] for k in (1, 3)]
    assert firsts[0] == firsts[1] == ["X", "C", "D"]


def test_a_smaller_k_gets_the_start_of_a_larger_k_s_answer() -> None:
    """A product page asks for 3 bundles, its "more" link for 10: the first five are ranked by score, more
    follow in the order grown, so every answer starts the answer to any larger ``k``. (Ranking all by score,
    the first three of ten differed from the three asked for on 67 of 400 demo anchors.)"""
    rng = np.random.default_rng(0)
    v = BundleView()
    items = [f"i{n}" for n in range(30)]
    for k in items:
        catalog(v, k, f"item {k} {rng.choice(['mug', 'cup', 'plate', 'bowl'])}", price=1.0, category=None)
    for k in items:
        others = [i for i in rng.permutation(items) if i != k][:20]
        publish(v, k, [(i, float(s)) for i, s in zip(others, np.sort(rng.random(20))[::-1])], orders=3)
    rules = BundleRules(max_per_category=None, candidates=20)
    for fit in (None, _model(**SPECIFIC, title_overlap=1.0)):
        for anchor in items[:10]:
            answers = [[[m.item_id for m in b.items] for b in build_bundles(v, [anchor], k, 2, rules, fit=fit)]
                       for k in range(1, 21)]
            most = answers[-1]
            assert len(most) > 10 and all(answer == most[:k] for k, answer in enumerate(answers, 1))
            scores = [b.score for b in build_bundles(v, [anchor], 5, 2, rules, fit=fit)]
            assert scores == sorted(scores, reverse=True)


def test_substitute_penalty_turns_the_substitute_rule_into_a_cost(view: BundleView) -> None:
    model = _model(**SPECIFIC)
    both = {"G", "T"}

    def pairs(penalty: float | None, fit: PairModel | None = model) -> list[bool]:
        rules = BundleRules(max_per_category=None, substitute_penalty=penalty)
        return [both <= {m.item_id for m in b.items} for b in build_bundles(view, ["A"], 5, 2, rules, fit=fit)]

    assert any(pairs(0.0))  # no cost: the twins may join one bundle
    assert not any(pairs(100.0)) and not any(pairs(None))  # a high cost or none at all: never together
    assert not any(pairs(0.0, fit=None))  # without a pair model the rule stays a rule

    def built(penalty: float) -> dict[frozenset[str], Bundle]:
        rules = BundleRules(max_per_category=None, substitute_penalty=penalty)
        return {frozenset(m.item_id for m in b.items): b for b in build_bundles(view, ["A"], 5, 2, rules, fit=model)}

    free, costly = built(0.0), built(1.0)
    twins = [key for key in free if both <= key]
    assert twins and any("interchangeable" in w for w in free[twins[0]].why)  # the why says a substitute was kept
    assert all(k not in costly or costly[k].score < free[k].score for k in twins)  # at a cost of 1 they drop out
    assert all(costly[k].score == free[k].score and not any("interchangeable" in w for w in free[k].why)
               for k in free.keys() & costly.keys() if not both <= k)  # the other bundles pay nothing


def test_a_cart_item_s_best_complement_is_not_held_back_by_the_other_items() -> None:
    """Cart X, Y: C completes X alone (relevance 1, not in Y's list), E completes Y alone, D fits both a little
    (0.6 each). Under the mean log-odds D would win (2.4 against 2); the log of the mean odds ranks C and E
    first (3.3 against 2.4), and a single anchor keeps its own log-odds."""
    v = BundleView()
    for k in "XYCDE":
        catalog(v, k, f"item {k}", price=1.0, category=f"cat {k}")
    publish(v, "X", [("C", 1.0), ("D", 0.6)], orders=10)
    publish(v, "Y", [("E", 1.0), ("D", 0.6)], orders=10)
    model = _model(relevance=4.0)
    rules = BundleRules(max_per_category=None)
    cart = build_bundles(v, ["X", "Y"], 3, 1, rules, include_anchor=False, fit=model)
    assert [b.items[0].item_id for b in cart] == ["C", "E", "D"]
    assert cart[0].score == pytest.approx(1 / (1 + 2 / (math.exp(4.0) + 1)), abs=1e-4)  # odds (e^4 + e^0) / 2
    assert cart[2].score == pytest.approx(1 / (1 + math.exp(-2.4)), abs=1e-4)
    one = build_bundles(v, ["Y"], 2, 1, rules, include_anchor=False, fit=model)
    assert [b.items[0].item_id for b in one] == ["E", "D"]
    assert one[1].score == pytest.approx(1 / (1 + math.exp(-2.4)), abs=1e-4)
