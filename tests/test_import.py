"""Importing shops' files: Online Retail through its mapping, Complete Journey with a catalog file, JSON lines,
bad rows by line number, wrong mappings at start, and `bundlegnn build-graph` with its dead-letter file."""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from graph.store import GraphConfig, GraphStore
from streaming.codec import encode
from tests.conftest import DATA, RETAIL_II, retail_events
from training.datasets import (BadRow, CsvMapping, DataConfig, ImportReport, import_into, read_events,
                               read_source)

CJ = DataConfig(path=DATA / "completejourney_transactions_sample.csv.gz", mapping=Path("configs/mappings/completejourney.yaml"),
                catalog_path=DATA / "completejourney_products_sample.csv.gz")


def _raw(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.reader(fh))


def test_raw_counts_match_the_dataset_readme() -> None:
    header, *rows = _raw(RETAIL_II)
    invoices = {r[0] for r in rows}
    assert len(rows) == 34_766 and len(invoices) == 1_742 and sum(i.startswith("C") for i in invoices) == 303
    assert len({r[1] for r in rows}) == 2_927 and len({r[6] for r in rows if r[6]}) == 262


def test_cleaned_graph_counts_and_why_they_differ(retail_replay) -> None:
    store, report = retail_replay
    summary = report.summary()
    assert summary["rows"] == 34_766 and summary["bad_rows"] == 0
    # 1,765 runs of consecutive rows (1,742 invoices, 23 of them twice: the workbook's two sheets overlap on
    # 2010-12-01..09); 134 runs hold only fee codes (e.g. POSTAGE alone) and make no event.
    assert report.dropped == {"skipped_item": 1_064, "empty_order": 134}
    assert summary["order_events"] + summary["cancel_events"] == 1_765 - 134
    # the store applies a repeated invoice once, by order_id: 21 placed and 2 cancellation repeats
    assert store.stats.duplicates == 23
    assert store.stats.orders_placed == summary["order_events"] - 21 == 1_363
    # Cancellations here never name the invoice they reverse ("C" + a new number), so none matches a placed
    # order; they change no edge and are refused (dead letters) with that reason.
    assert store.stats.orders_cancelled == 0 and store.stats.cancellations_unmatched == 245
    # Items: 2,927 codes less 5 fee codes (POST, M, ADJUST, D, C2) less 4 codes that occur only in cancellations.
    assert store.num_items == 2_927 - 5 - 4 == 2_918
    # Users: 262 customers less 8 whose only invoices are cancellations or fees.
    assert store.num_users == 254
    assert store.stats.placeholder_items == 0  # every bought item has a title
    assert store.num_co_edges() == 419_658 and store.num_ui_edges() == 20_364


def test_events_come_in_file_order_and_items_are_described_before_use() -> None:
    seen: set[str] = set()
    times = []
    for event in read_events(RETAIL_II):
        times.append(event.ts)
        if event.type == "item_upserted":
            seen.add(event.item_id)
        elif event.status == "placed":
            assert set(event.item_ids) <= seen
    # the file is two workbook sheets one after the other: in_time_order sorts, stable
    assert times != sorted(times) and [e.ts for e in retail_events()] == sorted(times)


def test_file_order_and_time_order_build_the_same_graph() -> None:
    """Inside the order window, the store does not care in which order events come."""
    a, b = GraphStore(GraphConfig(order_window_days=400)), GraphStore(GraphConfig())
    a.apply_all(read_events(RETAIL_II))
    b.apply_all(retail_events())

    def pairs(store: GraphStore) -> dict:
        x, y, count, weight = store.co_edges()
        ids = store.items.ids
        return {tuple(sorted((ids[i], ids[j]))): (c, w) for i, j, c, w in
                zip(x.tolist(), y.tolist(), count.tolist(), weight.tolist())}

    pa, pb = pairs(a), pairs(b)
    assert pa.keys() == pb.keys() and len(pa) == 419_658
    assert [pa[k][0] for k in pa] == [pb[k][0] for k in pa]
    assert np.allclose([pa[k][1] for k in pa], [pb[k][1] for k in pa], rtol=1e-5)
    assert a.stats.as_dict() == b.stats.as_dict()


def test_an_unsorted_file_outside_the_window_is_refused_with_the_reason(tmp_path: Path) -> None:
    store = GraphStore(GraphConfig(order_window_days=90))
    with open(tmp_path / "dead.jsonl", "w") as dead:
        done = import_into(store, read_source(DataConfig(path=RETAIL_II)), dead, RETAIL_II)
    refused = [json.loads(line) for line in open(tmp_path / "dead.jsonl")]
    outside = [r for r in refused if "outside the 90.0 days window" in r["reason"]]
    assert done.refused == len(refused) == store.stats.outside_window + store.stats.cancellations_unmatched
    assert len(outside) == store.stats.outside_window > 100
    header, *rows = _raw(RETAIL_II)
    first = outside[0]
    assert rows[first["line"] - 2][0] == json.loads(first["raw"])["order_id"]  # the line number points at the order


def test_known_co_purchase_from_the_file(retail_replay) -> None:
    store, _ = retail_replay
    # The two most co-bought items in this subset, checked independently with pandas:
    # SPACEBOY LUNCH BOX + DOLLY GIRL LUNCH BOX in 127 invoices.
    counts = store.co_purchase_matrix(counts=True).tocoo()
    best = counts.data.argmax()
    a, b = store.items.ids[counts.row[best]], store.items.ids[counts.col[best]]
    assert {a, b} == {"22629", "22630"} and counts.data[best] == 127


def test_import_is_fast() -> None:
    events = list(read_events(RETAIL_II))
    started = time.perf_counter()
    store = GraphStore(GraphConfig(order_window_days=400))
    store.apply_all(events)
    elapsed = time.perf_counter() - started
    assert store.num_co_edges() > 400_000
    assert elapsed < 5, f"applying took {elapsed:.1f}s"


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_rows_are_reported_by_line_and_the_good_ones_imported(tmp_path: Path) -> None:
    path = _csv(tmp_path / "shop.csv", [
        "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country",
        "1,P1,Red mug,1,2024-01-01 10:00:00,2.5,7.0,UK",
        "1,P2,Blue mug,two,2024-01-01 10:00:00,2.5,7.0,UK",           # line 3: quantity not a number
        "1,P3,Tea towel,1,2024-01-01 10:00:00,2.5,7.0,UK",
        "2,P1,Red mug,1,not a date,2.5,7.0,UK",                       # line 5: bad time: the whole order
        "3,P1,Red mug,1,2024-01-02 10:00:00,2.5,7.0,UK",
        "3,P4,Lamp,1,2024-01-02 10:00:00,abc,7.0,UK",                 # line 7: bad price
        "3,P5",                                                       # line 8: too few columns
        "3,P6,Plate,1,2024-01-02 10:00:00,1.0,7.0,UK",
    ])
    report = ImportReport()
    got = list(read_source(DataConfig(path=path), report))
    bad = {line: e.reason for line, e in got if isinstance(e, BadRow)}
    assert set(bad) == {3, 5, 7, 8} and report.bad_rows == 4
    assert bad[3] == "Quantity: 'two' is not a number" and bad[7] == "Price: 'abc' is not a number"
    assert bad[5].startswith("InvoiceDate: Invalid isoformat string")
    assert bad[8] == "too few columns"
    orders = [e for _, e in got if not isinstance(e, BadRow) and e.type == "order"]
    assert [(o.order_id, o.item_ids) for o in orders] == [("1", ["P1", "P3"]), ("3", ["P1", "P6"])]
    assert orders[0].user_id == "7" and [line for line, e in got if e is orders[1]] == [6]


def test_a_mapping_with_a_wrong_column_fails_at_start_naming_it(tmp_path: Path) -> None:
    path = _csv(tmp_path / "shop.csv", ["order,sku,when", "1,A,2024-01-01"])
    mapping = CsvMapping(order_id="order", item_id="product", ts="when")
    with pytest.raises(ValueError, match="mapping.item_id: no column 'product'"):
        read_source(DataConfig(path=path, mapping=mapping))
    with pytest.raises(ValueError, match="mapping.title: no column 'name'"):
        read_source(DataConfig(path=path, mapping=mapping.model_copy(update={"item_id": "sku", "title": "{name} x"})))
    with pytest.raises(ValueError, match="dataset not found"):
        read_source(DataConfig(path=tmp_path / "nope.csv", mapping=mapping))


def test_complete_journey_through_its_mapping_and_catalog_file() -> None:
    report = ImportReport()
    events = list(read_events(CJ, report))
    upserts = [e for e in events if e.type == "item_upserted"]
    orders = [e for e in events if e.type == "order"]
    products = _raw(CJ.catalog_path)[1:]
    fuel = {p[0] for p in products if p[2] in ("FUEL", "COUPON")}
    lines = _raw(CJ.path)[1:]
    kept = [r for r in lines if r[3] not in fuel and r[4] != "0"]  # a product line, with a quantity
    assert len(upserts) == len(products) - len(fuel) and report.bad_rows == 0
    assert len(orders) == len({r[2] for r in kept}) == 400 - report.dropped["empty_order"]
    assert sum(len(o.items) for o in orders) == len(kept)
    assert report.dropped["not_a_product"] == sum(r[3] in fuel for r in lines) == 16  # gasoline and coupon lines
    milk = next(e for e in upserts if e.item_id == "1082185")  # bananas, the most bought product
    assert milk.category == "PRODUCE/TROPICAL FRUIT" and milk.title.startswith("BANANAS")
    # New York local time: the first basket, 06:53:26 on 2017-01-01, is 11:53:26 UTC
    assert orders[0].ts.isoformat() == "2017-01-01T11:53:26+00:00" and orders[0].user_id == "900"
    store = GraphStore(GraphConfig())
    store.apply_all(events)
    uncatalogued = {r[3] for r in kept} - {p[0] for p in products}  # 17 products of the full data have no row
    assert store.stats.placeholder_items == len(uncatalogued) == 1 and store.stats.orders_placed == len(orders)


def test_json_lines_of_wire_events(tmp_path: Path) -> None:
    events = retail_events()[:300]
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8-sig") as fh:  # a byte-order mark first, as some exporters write
        for event in events:
            fh.write(encode(event).decode() + "\n")
        fh.write('{"type": "order", "order_id": "x"}\n')  # line 301: no items, no ts
        fh.write("not json\n")
    got = list(read_source(DataConfig(path=path, format="jsonl")))
    assert [e for _, e in got[:300]] == events
    assert [(line, type(e).__name__) for line, e in got[300:]] == [(301, "BadRow"), (302, "BadRow")]
    assert "items: Field required" in got[300][1].reason


def test_build_graph_writes_a_snapshot_and_the_dead_letters(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bundlegnn.cli import app
    from graph.snapshot import load

    path = _csv(tmp_path / "shop.csv", [
        "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country",
        "1,P1,Red mug,1,2024-06-01 10:00:00,2.5,7,UK",
        "1,P2,Blue mug,1,2024-06-01 10:00:00,2.5,7,UK",
        "2,P1,Red mug,1,2024-01-01 10:00:00,2.5,8,UK",   # five months before order 1: outside a 90-day window
        "2,P2,Blue mug,1,2024-01-01 10:00:00,2.5,8,UK",
        "3,P1,Red mug,x,2024-06-02 10:00:00,2.5,8,UK",
    ])
    dead = tmp_path / "dead.jsonl"
    result = CliRunner().invoke(app, ["build-graph", "--data", str(path), "--out", str(tmp_path / "graph"),
                                      "--dead-letters", str(dead)], env={"BUNDLEGNN_PATHS__STATE_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert summary["graph"]["co_purchase_edges"] == 1 and summary["graph"]["outside_window"] == 1
    assert "not sorted by time" in result.stderr
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(d["line"], d["reason"][:20]) for d in letters] == [(6, "Quantity: 'x' is not"), (4, "order 2 is dated 152")]
    assert load(tmp_path / "graph").co_purchase("P1", "P2").count == 1


def test_a_shop_export_with_its_own_columns_and_a_status_column(tmp_path: Path) -> None:
    """A mapping written for another layout: epoch times, a status column marking cancellations, a fee line."""
    path = _csv(tmp_path / "export.csv", [
        "when;order;sku;who;status;name",
        "1704103200;A-1;mug;c1;paid;Red mug",
        "1704103200;A-1;plate;c1;paid;Plate",
        "1704103200;A-1;SHIP;c1;paid;Shipping",
        "1704189600;A-2;mug;c2;paid;Red mug",
        "1704189600;A-2;bowl;c2;paid;Bowl",
        "1704276000;A-1;mug;c1;cancelled;Red mug",
    ])
    mapping = CsvMapping(order_id="order", item_id="sku", ts="when", ts_format="epoch", user_id="who", title="name",
                         cancel_if={"status": ["cancelled"]}, skip_if={"sku": ["SHIP"]}, delimiter=";")
    store = GraphStore(GraphConfig())
    report = ImportReport()
    with open(tmp_path / "dead.jsonl", "w") as dead:
        done = import_into(store, read_source(DataConfig(path=path, mapping=mapping), report), dead, path)
    assert done.bad_rows == 0 and done.refused == 0 and report.dropped == {"skipped_item": 1}
    assert report.orders_placed == 2 and report.orders_cancelled == 1
    assert store.co_purchase("mug", "plate") is None  # A-1 taken back
    assert store.co_purchase("mug", "bowl").count == 1 and store.stats.orders_cancelled == 1
    assert store.catalog[store.items.index["bowl"]].title == "Bowl"


def test_interleaved_lines_of_orders_placed_together_form_whole_orders(tmp_path: Path) -> None:
    """Exports sorted by time interleave the lines of orders placed in the same minute (Online Retail II full:
    698 invoices, 12,721 lines). Each is one whole order; an id that comes back further on than
    ``mapping.interleaved_rows`` is a repeat and counts once; a status row cancels the open order."""
    path = _csv(tmp_path / "export.csv", [
        "order,sku,when,status",
        "A,mug,2024-01-01T10:00:00,paid",
        "A,plate,2024-01-01T10:00:00,",
        "B,lamp,2024-01-01T10:00:00,paid",
        "B,shade,2024-01-01T10:00:00,",
        "A,bowl,2024-01-01T10:01:00,",        # more of A, two rows after its last
        "B,bulb,2024-01-01T10:01:00,",
        "C,mug,2024-01-01T11:00:00,paid",
        "C,bowl,2024-01-01T11:00:00,",
        "B,lamp,2024-01-01T11:00:00,refunded",  # B's refund, not more of its lines
        "B,shade,2024-01-01T11:00:00,",
        "D,cup,2024-01-01T12:00:00,paid",
        "D,saucer,2024-01-01T12:00:00,",
        "A,cup,2024-01-01T12:00:00,paid",     # A again, further on than the window: a repeat
    ])
    mapping = CsvMapping(order_id="order", item_id="sku", ts="when", cancel_if={"status": ["refunded"]},
                         interleaved_rows=4)
    got = [e for _, e in read_source(DataConfig(path=path, mapping=mapping)) if e.type == "order"]
    assert [(o.order_id, o.status, o.item_ids) for o in got] == [
        ("A", "placed", ["mug", "plate", "bowl"]), ("B", "placed", ["lamp", "shade", "bulb"]),
        ("C", "placed", ["mug", "bowl"]), ("B", "cancelled", ["lamp", "shade"]), ("D", "placed", ["cup", "saucer"]),
        ("A", "placed", ["cup"])]
    store = GraphStore(GraphConfig())
    with open(tmp_path / "dead.jsonl", "w") as dead:
        import_into(store, read_source(DataConfig(path=path, mapping=mapping)), dead, path)
    assert store.co_purchase("mug", "bowl").count == 2 and store.co_purchase("plate", "bowl").count == 1
    assert store.co_purchase("lamp", "bulb") is None and store.stats.orders_cancelled == 1
    assert store.stats.duplicates == 1 and store.co_purchase("mug", "cup") is None  # A's repeat counted once
    consecutive = mapping.model_copy(update={"interleaved_rows": 0})  # the old rule: A and B each split in two
    got = [e for _, e in read_source(DataConfig(path=path, mapping=consecutive)) if e.type == "order"]
    assert [(o.order_id, o.item_ids) for o in got][:4] == [("A", ["mug", "plate"]), ("B", ["lamp", "shade"]),
                                                             ("A", ["bowl"]), ("B", ["bulb"])]


def test_a_spreadsheet_export_with_a_byte_order_mark_and_decimal_commas(tmp_path: Path) -> None:
    """A European "CSV UTF-8" export: a byte-order mark before the first column's name, ';' between columns,
    prices with a decimal comma and dots between thousands. A number the mark makes ambiguous is refused, never
    guessed; under the default '.' a decimal comma is refused with a hint."""
    path = tmp_path / "export.csv"
    path.write_text("\n".join([
        "Bestellung;Artikel;Datum;Menge;Preis",
        "1;mug;2024-01-01T10:00:00;2;2,55",
        "1;lamp;2024-01-01T10:00:00;1;1.234,50",
        "1;plate;2024-01-01T10:00:00;1;2.55",                        # line 4: '.' is no decimal mark here
        "2;mug;2024-01-02T10:00:00;1,0;3",
    ]) + "\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    mapping = CsvMapping(order_id="Bestellung", item_id="Artikel", ts="Datum", quantity="Menge", price="Preis",
                         delimiter=";", decimal=",")
    got = list(read_source(DataConfig(path=path, mapping=mapping)))
    bad = {line: e.reason for line, e in got if isinstance(e, BadRow)}
    assert bad == {4: "Preis: '2.55' is not a number with a decimal comma (mapping.decimal is ',')"}
    orders = [e for _, e in got if not isinstance(e, BadRow) and e.type == "order"]
    assert [[(x.item_id, x.quantity, x.price) for x in o.items] for o in orders] == [
        [("mug", 2, 2.55), ("lamp", 1, 1234.5)], [("mug", 1, 3.0)]]
    got = list(read_source(DataConfig(path=path, mapping=mapping.model_copy(update={"decimal": "."}))))
    bad = {line: e.reason for line, e in got if isinstance(e, BadRow)}
    assert bad[2] == "Preis: '2,55' is not a number (a decimal comma? set mapping.decimal: ',')"
    assert set(bad) == {2, 3, 5}  # 1.234,50 and the quantity 1,0 are no numbers either


def test_goods_sold_by_weight_are_bought_not_dropped(tmp_path: Path) -> None:
    """A grocer's export: loose produce is sold by the kilogram, so a line's quantity may be a fraction. Such a
    line is part of its order (it was read as 0 and dropped before); a quantity of 0 still drops its line."""
    path = _csv(tmp_path / "grocer.csv", [
        "order,sku,when,kg",
        "1,apples,2024-01-01T10:00:00,0.35",
        "1,cheese,2024-01-01T10:00:00,0.2",
        "1,bread,2024-01-01T10:00:00,1",
        "1,bag,2024-01-01T10:00:00,0",
    ])
    mapping = CsvMapping(order_id="order", item_id="sku", ts="when", quantity="kg")
    report = ImportReport()
    got = [e for _, e in read_source(DataConfig(path=path, mapping=mapping), report)]
    assert not [e for e in got if isinstance(e, BadRow)] and report.dropped["quantity_sign"] == 1
    (order,) = [e for e in got if e.type == "order"]
    assert [(x.item_id, x.quantity) for x in order.items] == [("apples", 0.35), ("cheese", 0.2), ("bread", 1)]
    store = GraphStore()
    for e in got:
        store.apply(e)
    assert store.num_co_edges() == 3  # apples–cheese, apples–bread, cheese–bread


def test_an_event_spool_reads_back_the_same_graph_on_every_pass_and_removes_its_file(tmp_path: Path) -> None:
    """EventSpool: the events of a real file written once (orders as their facts, in small chunks) and read back
    twice give the store the parsed events give; reading before sealing and adding after are refused; close()
    removes the file."""
    import gc

    from graph.events import Order, OrderFacts
    from training.datasets import EventSpool

    events = list(read_events(RETAIL_II))
    spool = EventSpool(tmp_path / "spool", chunk=1000)
    for e in events:
        spool.add(e)
    with pytest.raises(RuntimeError, match="seal"):
        next(spool())
    spool.seal()
    with pytest.raises(RuntimeError, match="sealed"):
        spool.add(events[0])
    first, second = list(spool()), list(spool())
    assert len(first) == len(second) == spool.events == len(events) > 1000
    assert [e.facts() if isinstance(e, Order) else e for e in events] == first == second
    assert any(isinstance(e, OrderFacts) for e in first) and not any(isinstance(e, Order) for e in first)
    want, got = GraphStore(GraphConfig()), GraphStore(GraphConfig())
    want.apply_all(events)
    got.apply_all(spool())
    assert got.items.ids == want.items.ids and got.num_co_edges() == want.num_co_edges() > 0
    assert got.num_ui_edges() == want.num_ui_edges() and got.users.ids == want.users.ids
    assert np.array_equal(got.item_order_counts(), want.item_order_counts())
    spool.close()
    assert list((tmp_path / "spool").iterdir()) == []
    other = EventSpool(tmp_path / "spool")  # an abandoned spool is removed when it is collected
    assert len(list((tmp_path / "spool").iterdir())) == 1
    del other
    gc.collect()
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_spool_left_by_a_killed_job_is_removed_by_the_next_one_and_a_living_one_is_not(tmp_path: Path) -> None:
    """A retraining killed for memory leaves its spool (about 0.5 GB at 200k items): the next job's spool removes the
    files no living job holds, whatever their age says, and leaves a living job's."""
    import os
    import subprocess
    import sys

    from training.datasets import EventSpool

    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
                             "from training.datasets import EventSpool; s = EventSpool(Path(sys.argv[1])); "
                             "s.add(None); s.seal(); os.kill(os.getpid(), signal.SIGKILL)", str(tmp_path)],
                            cwd=Path(__file__).resolve().parents[1])
    assert killed.returncode == -9
    (left,) = tmp_path.glob("events-*.spool")
    living = EventSpool(tmp_path)
    young = tmp_path / "events-young.spool"  # a job's that has not locked it yet
    young.write_bytes(b"")
    hour_ago = time.time() - 3600
    for path in (left, living.path):
        os.utime(path, (hour_ago, hour_ago))
    new = EventSpool(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted([living.path, new.path, young])
    living.close()
    new.close()
    assert list(tmp_path.iterdir()) == [young]


def test_a_spool_out_of_time_order_is_sorted_on_disk_as_a_sort_in_memory_would(tmp_path: Path) -> None:
    """Online Retail II's two sheets overlap by 8 days: its events are sorted in runs merged from disk, and
    come out as the stable in-memory sort gives them (equal times in file order)."""
    from graph.events import Order
    from training.datasets import EventSpool, in_time_order

    events = list(read_events(RETAIL_II))
    assert any(b.epoch < a.epoch for a, b in zip(events, events[1:]))  # not in time order
    spool = EventSpool(tmp_path, chunk=500)
    for e in events:
        spool.add(e)
    ordered = spool.seal().in_time_order(run=1000)  # many runs
    want = [e.facts() if isinstance(e, Order) else e for e in in_time_order(events)]
    assert len(want) > 5 * 1000 and list(ordered()) == want
    assert list(tmp_path.iterdir()) == [ordered.path]  # the runs and the unsorted spool are gone
    ordered.close()
