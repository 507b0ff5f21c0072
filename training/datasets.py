"""Dataset adapters: turn a shop's transaction file into the ordered event stream.

The batch graph is built by applying these events through
:meth:`graph.store.GraphStore.apply`, the same code the stream worker runs, and
``bundlegnn replay`` sends the very same events to Kafka.

Supported: UCI Online Retail (``InvoiceNo``/``UnitPrice``/``CustomerID``) and
Online Retail II (``Invoice``/``Price``/``Customer ID``), gzip or plain CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from graph.events import ItemUpserted, Order, OrderLine

#: Stock codes that are fees or adjustments, not products (see the dataset READMEs).
NON_PRODUCT_CODES = frozenset(
    {"POST", "DOT", "M", "BANK CHARGES", "AMAZONFEE", "D", "CRUK", "S", "PADS", "B", "C2", "ADJUST",
     "ADJUST2", "TEST001", "TEST002", "GIFT"}
)

_ALIASES = {
    "Invoice": "invoice", "InvoiceNo": "invoice",
    "StockCode": "code", "Description": "description", "Quantity": "quantity",
    "InvoiceDate": "date", "Price": "price", "UnitPrice": "price",
    "Customer ID": "customer", "CustomerID": "customer", "Country": "country",
}


@dataclass
class ReplayReport:
    """What the file held (raw counts, comparable to the dataset README) and what was dropped."""

    rows: int = 0
    invoices: set[str] = field(default_factory=set)
    stock_codes: set[str] = field(default_factory=set)
    customers: set[str] = field(default_factory=set)
    orders_placed: int = 0
    orders_cancelled: int = 0
    item_upserts: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "invoices": len(self.invoices),
            "cancellation_invoices": sum(i.startswith("C") for i in self.invoices),
            "stock_codes": len(self.stock_codes),
            "customers": len(self.customers),
            "order_events": self.orders_placed,
            "cancel_events": self.orders_cancelled,
            "item_upserts": self.item_upserts,
            "dropped_rows": dict(self.dropped),
        }


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _rows(path: Path) -> Iterator[dict[str, str]]:
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader)
        missing = {"invoice", "code", "description", "quantity", "date", "price", "customer"} - {
            _ALIASES.get(h, h) for h in header
        }
        if missing:
            raise ValueError(f"{path}: not an Online Retail file, missing columns {sorted(missing)}")
        keys = [_ALIASES.get(h, h) for h in header]
        for values in reader:
            yield dict(zip(keys, values))


def _customer(raw: str) -> str | None:
    raw = raw.strip()
    if not raw:
        return None
    return raw[:-2] if raw.endswith(".0") else raw


def _ts(raw: str) -> datetime:
    return datetime.fromisoformat(raw.strip()).replace(tzinfo=timezone.utc)


def online_retail_events(
    path: str | os.PathLike[str], report: ReplayReport | None = None
) -> Iterator[ItemUpserted | Order]:
    """Yield catalog upserts and orders in invoice-time order.

    An invoice is one contiguous run of rows; a run that repeats an earlier
    invoice number (the two workbook sheets overlap) is yielded again and the
    graph store ignores it by ``order_id``. ``C`` invoices become cancellations.
    An item gets an upsert before the first order that contains it and again
    whenever its (non-empty) description changes. Fee codes and lines with a
    non-positive quantity are dropped and counted in ``report.dropped``.
    """
    report = report if report is not None else ReplayReport()
    runs: list[tuple[datetime, int, list[dict[str, str]]]] = []
    for row in _rows(Path(path)):
        report.rows += 1
        report.invoices.add(row["invoice"])
        report.stock_codes.add(row["code"])
        if customer := _customer(row["customer"]):
            report.customers.add(customer)
        if not runs or runs[-1][2][0]["invoice"] != row["invoice"]:
            runs.append((_ts(row["date"]), len(runs), []))
        runs[-1][2].append(row)
    runs.sort(key=lambda r: (r[0], r[1]))

    described: dict[str, str] = {}
    for ts, _, rows in runs:
        invoice = rows[0]["invoice"]
        cancelled = invoice.startswith("C")
        lines: list[OrderLine] = []
        for row in rows:
            code = row["code"].strip()
            quantity = int(float(row["quantity"]))
            if code.upper() in NON_PRODUCT_CODES:
                report.dropped["non_product_code"] += 1
                continue
            if quantity == 0 or (quantity < 0) != cancelled:
                report.dropped["quantity_sign"] += 1
                continue
            price = float(row["price"]) if row["price"].strip() else None
            if price is not None and price < 0:
                report.dropped["negative_price"] += 1
                continue
            title = " ".join(row["description"].split())
            if title and described.get(code) != title and not cancelled:
                described[code] = title
                report.item_upserts += 1
                yield ItemUpserted(item_id=code, title=title, price=price, ts=ts)
            lines.append(OrderLine(item_id=code, quantity=abs(quantity), price=price))
        if not lines:
            report.dropped["empty_invoice"] += 1
            continue
        status = "cancelled" if cancelled else "placed"
        report.orders_cancelled += cancelled
        report.orders_placed += not cancelled
        yield Order(order_id=invoice, user_id=_customer(rows[0]["customer"]), items=lines, status=status, ts=ts)
