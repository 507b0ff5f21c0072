"""The builder's fitted pair score: the logistic fit, the pair features read from the view, and the builder
ranking by it under the same rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.bundle_fit import FEATURES, PairModel, fit_on_orders, pair_features
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
    assert list(a_p) == pytest.approx([1.0, 0.2, 0.0, 0.0, 0.0, 0.0, math.log1p(5000)])
    assert list(a_g) == pytest.approx([0.5, 1.0, math.log1p(1), 0.0, 2 / 5, 0.0, math.log1p(30)])  # trail, tent
    assert x[1, 2, 5] == 1.0 and x[1, 2, 3] == 1.0  # G and T: published substitutes, one category
    assert a_t[2] == pytest.approx(math.log1p(3))  # rank 3 in A's list
    assert x[1, 0, 2] == pytest.approx(math.log1p(2)) and x[1, 0, 1] == 0.0  # P not in G's list (the rank after its last), nor G in P's


def test_logistic_fit_finds_the_sign_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, len(FEATURES)))
    y = rng.random(2000) < 1 / (1 + np.exp(-(2 * x[:, 0] - 3 * x[:, 6] - 1)))
    model = PairModel.fit(x, y)
    assert model.weights[0] > 1 and model.weights[6] < -1.5 and all(abs(w) < 0.3 for w in model.weights[1:6])
    assert (model.pairs, model.positives) == (2000, int(y.sum()))
    again = PairModel.model_validate_json(model.model_dump_json())  # as the API reads it from a manifest
    assert np.allclose(again.logits(x), model.logits(x))
    with pytest.raises(ValueError, match="this version computes"):
        PairModel.model_validate({**model.model_dump(), "features": ["relevance"]})
    with pytest.raises(ValueError, match="positive and negative"):
        PairModel.fit(x[:10], np.ones(10, bool))


def test_fit_on_orders_learns_that_a_best_seller_completes_few_orders(view: BundleView) -> None:
    orders = [["A", "G"], ["A", "L"], ["A", "G", "L"], ["G", "L"], ["P", "L"]] * 4
    model = fit_on_orders(view, orders)
    assert model.weights[FEATURES.index("log_orders")] < 0
    logit = model.logits(pair_features(view, ["A"], ["P", "G"]))[0]
    assert logit[1] > logit[0]
    with pytest.raises(ValueError, match="no order holds"):
        fit_on_orders(view, [["X", "Y"]])


def test_builder_ranks_by_the_fitted_score_under_the_same_rules(view: BundleView) -> None:
    rules = BundleRules(max_per_category=None)
    by_relevance = build_bundles(view, ["A"], 1, 2, rules)[0]
    assert [m.item_id for m in by_relevance.items] == ["A", "P", "L"]  # the best seller first
    model = fit_on_orders(view, [["A", "G"], ["A", "L"], ["A", "G", "L"], ["G", "L"], ["P", "L"]] * 4)
    fitted = build_bundles(view, ["A"], 3, 2, rules, fit=model)
    first = [m.item_id for m in fitted[0].items]
    assert first[0] == "A" and set(first[1:]) == {"G", "L"}  # not the best seller; pegs and lamp fit each other
    assert all(not {"G", "T"} <= {m.item_id for m in b.items} for b in fitted)  # substitutes never together
    assert 0 < fitted[0].score < 1 and [b.score for b in fitted] == sorted((b.score for b in fitted), reverse=True)
    assert build_bundles(view, ["A"], 1, 2, rules.model_copy(update={"in_stock_only": True}), fit=model)[0].why


def test_substitute_penalty_turns_the_substitute_rule_into_a_cost(view: BundleView) -> None:
    model = fit_on_orders(view, [["A", "G"], ["A", "L"], ["A", "G", "L"], ["G", "L"], ["P", "L"]] * 4)
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
