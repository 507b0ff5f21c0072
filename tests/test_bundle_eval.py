"""The bundle task: the intent-bundles reader, its time split, the set metrics, and the whole evaluation on a cut
of the Electronic domain (the API's builder against real bundles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph.events import ItemUpserted, Order
from graph.store import GraphConfig
from serving.bundle_eval import BundleQuery, bundle_queries, evaluate_domain, markdown, scores, summarise
from serving.bundles import BundleRules
from training.complements import ScorerConfig
from training.encoder import TextEncoder
from training.intent_bundles import IntentBundles, RealBundle, category_path
from training.protocol import time_split
from training.titles import title_overlap
from training.train import TrainConfig

SAMPLE = Path(__file__).parent / "data" / "intent_bundles_electronic"


@pytest.fixture(scope="module")
def data() -> IntentBundles:
    return IntentBundles.read(SAMPLE)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("enc"))


def test_category_paths_keep_names_with_commas() -> None:
    assert category_path("[[Clothing, Shoes & Jewelry,Women,Shoes]]") == ("Clothing, Shoes & Jewelry", "Women", "Shoes")
    assert category_path("[[Electronics,Cables],[Electronics,Power,Plugs]]") == ("Electronics", "Power", "Plugs")
    assert category_path("[[Electronics,Cables],[Electronics,Power]]") == ("Electronics", "Cables")
    assert category_path("[[]]") == ()


def test_reader_counts_and_texts(data: IntentBundles) -> None:
    assert (len(data.sessions), len(data.bundles), len(data.titles)) == (302, 466, 906)
    sessions = {s.session_id: s for s in data.sessions}
    assert all(set(b.items) <= set(sessions[b.session_id].items) for b in data.bundles)  # bundles are parts of sessions
    assert not any("&amp;" in t for t in data.titles.values())  # HTML entities read as text
    assert [b.epoch for b in data.bundles] == sorted(b.epoch for b in data.bundles)


def test_time_split_keeps_every_test_session_and_bundle_out_of_training(data: IntentBundles) -> None:
    train, test, cut = data.split(0.2)
    assert train and test and max(b.epoch for b in train) < cut <= min(b.epoch for b in test)
    assert len(test) / len(data.bundles) == pytest.approx(0.2, abs=0.05)  # whole days: about the share asked
    events = data.events(cut)
    orders = [e for e in events if isinstance(e, Order)]
    assert all(o.epoch < cut for o in orders)
    ids = {o.order_id for o in orders}
    assert {f"bundle:{b.bundle_id}" for b in train} <= ids and not {f"bundle:{b.bundle_id}" for b in test} & ids
    assert len([e for e in events if isinstance(e, ItemUpserted)]) == 906


def test_a_validation_period_never_starts_inside_a_day(data: IntentBundles) -> None:
    """A session and the bundle marked in it are two orders of one day: were the day split, the bundle would
    validate the pair model on items already bought together in training."""
    _, _, cut = data.split(0.2)
    events = data.events(cut)
    days = [e.epoch for e in events if isinstance(e, Order)]
    straddled = 0
    for val_frac in (0.1, 0.15, 0.2, 0.25, 0.3):
        k = int(len(days) * (1 - val_frac))
        straddled += days[k - 1] == days[k]  # where a cut by count alone would split a day
        split = time_split(events, GraphConfig(), test_frac=0.0, val_frac=val_frac, with_train=False)
        start = split.protocol["val_from_epoch"]
        assert split.fit.stats.orders_placed == sum(d < start for d in days) > 0
        assert sum(d >= start for d in days) >= len(days) - k
    assert straddled >= 2


def test_queries_and_set_metrics_by_hand() -> None:
    b = RealBundle("1", ("a", "b", "c"), "intent", "u", "s", 0.0)
    one = bundle_queries([b], "one_item", {"a", "b", "c"})
    assert [(q.anchors, q.hidden) for q in one] == [(("a",), ("b", "c")), (("b",), ("a", "c")), (("c",), ("a", "b"))]
    cart = bundle_queries([b], "all_but_one", {"a", "b", "c"})
    assert [(q.anchors, q.hidden) for q in cart][0] == (("b", "c"), ("a",))
    assert bundle_queries([b], "one_item", {"a", "b"}) == []  # an item nobody can know: no question
    data = IntentBundles("d", {"a": "Red Mug", "b": "Red Mug Large", "x": "Tea Towel"},
                         {"a": ("Home", "Mugs"), "b": ("Home", "Mugs"), "x": ("Home", "Towels")}, [], [b])
    got = scores(BundleQuery(b, ("a",), ("b", "c")), [["x", "b"], ["b", "c"]], data)
    assert got["f1_top1"] == pytest.approx(0.5) and got["f1_best"] == 1.0 and got["hit"] == 1.0
    assert got["substitute_rate"] == pytest.approx(1 / 3)  # a–b of a, x, b: same leaf, titles alike
    assert got["category_diversity"] == pytest.approx(2 / 3)
    assert title_overlap("Red Mug", "red mug, large") == pytest.approx(2 / 3)


def test_the_api_builder_on_real_bundles(data: IntentBundles, encoder: TextEncoder) -> None:
    """The whole task on the cut: trained as ``bundlegnn train`` trains, lists as the worker publishes them, bundles
    as the API builds them. The builder must find real members far more often than popularity or text alone, keep
    fewer substitutes than the raw top complements, and the detector with categories must be at least as precise
    as text alone at the same recall."""
    cfg = TrainConfig(epochs=3, hidden=32, decoder_lambdas=[25.0], decoder_text_weights=[30.0],
                      decoder_gnn_weights=[0.0, 10.0], user_weights=[0.0], gnn_budget_s=60)
    report = evaluate_domain(data, GraphConfig(), cfg, ScorerConfig(), BundleRules(), encoder, seed=0)
    one = report["settings"]["one_item"]
    assert report["protocol"]["queries"]["one_item"] > 200
    assert one["builder"]["f1_top1"] > 2 * one["popularity"]["f1_top1"]
    assert one["builder"]["f1_best"] > one["text"]["f1_best"]
    assert one["builder"]["substitute_rate"] < one["top_complements"]["substitute_rate"]
    # the pair model fitted on the candidate's validation orders ranks better than relevance alone
    assert report["pair_model"]["positives"] > 50
    assert one["builder"]["f1_top1"] > 1.2 * max(one["top_complements"]["f1_top1"], one["builder_unfitted"]["f1_top1"])
    cart = report["settings"]["all_but_one"]
    assert cart["builder"]["hit"] > cart["popularity"]["hit"]
    lab = report["labels"]
    assert len(lab["builder_label"]) == report["protocol"]["queries"]["one_item"]
    assert np.mean(lab["real_bundle_label"]) > np.mean(lab["anchor_title"])  # a bundle's label says more than a title
    sub = report["substitutes"]
    assert sub["substitute_pairs"] > 20 and sub["bundle_pairs"] > 500
    for t, m in sub["text_same_category"].items():
        assert m["precision"] >= sub["text"][t]["precision"] and m["recall"] == sub["text"][t]["recall"]
    ex = report["example"]
    assert ex["built"]["items"][0]["item_id"] == ex["real"][0]["item_id"] == ex["anchor"] and ex["built"]["label"]
    assert {m["item_id"] for m in ex["built"]["items"][1:]} & {r["item_id"] for r in ex["real"][1:]}
    text = markdown([summarise([report])])
    assert "builder vs top_complements" in text and "Substitute detectors" in text


def test_earlier_folds_give_the_pair_model_orders_no_list_was_made_from(data: IntentBundles, encoder: TextEncoder,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """``training.pair_folds``: each earlier fold trains on the events before the previous fold's validation
    orders and validates on the slice before them, so its orders are new to its lists; the pair model is fitted
    on every fold's examples; too few orders for a fold: fewer folds, with a warning."""
    from serving.bundle_fit import FEATURES, fit_candidate, flagged_examples, published_examples, refit
    from training import job

    cfg = TrainConfig(epochs=2, hidden=16, decoder_lambdas=[25.0], decoder_text_weights=[30.0],
                      decoder_gnn_weights=[0.0], user_weights=[0.0], head_weights=[0.0], gnn_budget_s=30)
    events = data.events(data.split(0.2)[2])
    cand = job.fit(events, cfg, GraphConfig(), encoder)
    main = job.validation_lists(cand, ScorerConfig())
    job.release_fit(cand)
    assert cand.split.fit is None and cand.text_fit is None
    folds = list(job.earlier_folds(events, cand, 2, cfg, GraphConfig(), encoder, ScorerConfig(), min_orders=5))
    assert len(folds) == 2
    # the lists of each fold are made over 90 % of the orders before the later one's (fewer: the orders dated
    # with the first of a later validation slice go with it)
    n = cand.split.protocol["train_orders"]
    placed = [s.stats.orders_placed for s, _, _ in (main, *folds)]
    assert placed[0] > placed[1] > placed[2] and placed == pytest.approx([n * 0.9, n * 0.81, n * 0.729], rel=0.03)
    assert all(len(orders) >= 5 for _, _, orders in folds)
    examples = [published_examples(*f) for f in (main, *folds)]
    assert all(e.y.any() and not e.y.all() for e in examples)

    kept: list = []
    fitted = {k: fit_candidate(job.fit(events, cfg.model_copy(update={"pair_folds": k}), GraphConfig(), encoder), events,
                               cfg.model_copy(update={"pair_folds": k}), GraphConfig(), encoder, ScorerConfig(),
                               kept if k == 3 else None)
              for k in (1, 3)}
    assert fitted[1].pairs == len(examples[0].y)  # one fold: the validation orders alone, as before
    assert fitted[3].pairs == sum(len(e.y) for e in examples)
    # the folds it kept refit to the same model under the same scoring, and without substitutes flag none
    assert len(kept) == 3 and [len(o) for *_, o in kept] == [len(o) for *_, o in (main, *folds)]
    store = kept[0][0]
    rows = [r for r, it in enumerate(store.catalog) if it.has_text]
    index = {store.items.ids[r]: k for k, r in enumerate(rows)}
    text = encoder.encode([store.catalog[r].text for r in rows], progress=False)
    same = ScorerConfig()
    assert all(np.array_equal(flagged_examples(f, same, index, text).x, published_examples(*f).x) for f in kept)
    assert refit(kept, same, index, text).weights == pytest.approx(fitted[3].weights, abs=1e-6)
    column = FEATURES.index("substitute")
    flagged = [published_examples(*f).x[:, column].sum() for f in kept]
    assert sum(flagged) > 0 and all(not flagged_examples(f, same.model_copy(update={"max_substitutes": 0}), index,
                                                        text).x[:, column].any() for f in kept)
    with caplog.at_level("WARNING", logger="training.job"):
        assert list(job.earlier_folds(events, cand, 2, cfg, GraphConfig(), encoder, ScorerConfig(),
                                      min_orders=10_000)) == []
    assert "0 of 2 earlier folds trained" in caplog.text
