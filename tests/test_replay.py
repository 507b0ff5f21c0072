"""Replaying the real Online Retail II subset through the graph store."""

from __future__ import annotations

import time

import pytest

from graph.store import GraphConfig, GraphStore
from training.datasets import NON_PRODUCT_CODES, ReplayReport, online_retail_events
from tests.conftest import RETAIL_II


def test_raw_counts_match_the_dataset_readme(retail_replay) -> None:
    _, report = retail_replay
    summary = report.summary()
    assert summary["rows"] == 34_766
    assert summary["invoices"] == 1_742  # incl. cancellations
    assert summary["stock_codes"] == 2_927
    assert summary["customers"] == 262


def test_cleaned_graph_counts_and_why_they_differ(retail_replay) -> None:
    store, report = retail_replay
    # 303 cancellation invoices, 1,439 placed; 134 invoices hold only fee codes (e.g. POSTAGE alone).
    assert report.summary()["cancellation_invoices"] == 303
    assert report.dropped == {"non_product_code": 1_064, "empty_invoice": 134}
    # 23 invoices appear twice (the two workbook sheets overlap on 2010-12-01..09): the
    # store applies each once, by order_id.
    assert store.stats.duplicates == 23
    assert store.stats.orders_placed == 1_363
    # Cancellations here never name the invoice they reverse ("C" + a new number), so
    # none matches a placed order; they change no edge.
    assert store.stats.orders_cancelled == 0 and store.stats.cancellations_unmatched == 245
    # Items: 2,927 codes less 5 fee codes (POST, M, ADJUST, D, C2) less 4 codes that
    # occur only in cancellations.
    fee_codes = {c for c in report.stock_codes if c.upper() in NON_PRODUCT_CODES}
    assert sorted(fee_codes) == ["ADJUST", "C2", "D", "M", "POST"]
    assert store.num_items == 2_927 - 5 - 4 == 2_918
    # Users: 262 customers less 8 whose only invoices are cancellations or fees.
    assert store.num_users == 254
    assert store.stats.placeholder_items == 0  # every bought item has a title


def test_events_are_in_time_order_and_items_described_before_use() -> None:
    seen: set[str] = set()
    last = None
    for event in online_retail_events(RETAIL_II):
        assert last is None or event.ts >= last
        last = event.ts
        if event.type == "item_upserted":
            seen.add(event.item_id)
        elif event.status == "placed":
            assert set(event.item_ids) <= seen


def test_known_co_purchase_from_the_file(retail_replay) -> None:
    store, _ = retail_replay
    # The two most co-bought items in this subset, checked independently with pandas:
    # SPACEBOY LUNCH BOX + DOLLY GIRL LUNCH BOX in 127 invoices.
    counts = store.co_purchase_matrix(counts=True).tocoo()
    best = counts.data.argmax()
    a, b = store.items.ids[counts.row[best]], store.items.ids[counts.col[best]]
    assert {a, b} == {"22629", "22630"} and counts.data[best] == 127


def test_replay_builds_the_graph_fast() -> None:
    started = time.perf_counter()
    store = GraphStore(GraphConfig())
    store.apply_all(online_retail_events(RETAIL_II))
    elapsed = time.perf_counter() - started
    assert store.num_co_edges() > 400_000
    assert elapsed < 10, f"replay took {elapsed:.1f}s"


def test_wrong_file_is_refused_with_the_missing_columns(tmp_path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        list(online_retail_events(path, ReplayReport()))
