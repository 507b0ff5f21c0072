"""Importing a shop's data: files turned into the events Kafka carries, read as a stream.

``bundlegnn build-graph`` applies these events through
:meth:`graph.store.GraphStore.apply_many` (the code the stream worker runs)
and ``bundlegnn replay`` sends the very same events to Kafka. Two kinds of
file, plain or gzip:

* **JSON lines** (``format: jsonl``): one wire event per line, exactly as
  on the Kafka topics (see README, "Events").
* **CSV** (``format: csv``) through a :class:`CsvMapping` that names the
  column (or ``{column}`` template) of each field; one row per order line.
  The rows with one order id form one order, also where other orders' rows
  come between (``interleaved_rows``: files sorted by time). A shop writes a
  mapping for its own export (``configs/mappings/`` has Online Retail,
  Online Retail II and Complete Journey).

Files are read row by row: memory does not grow with the file's length
(only with its items and users). Events come in file order; the graph
store handles late events exactly inside its order window
(``graph.order_window_days``) and refuses older ones with a reason. A row
that cannot be read becomes a :class:`BadRow` with its line number and the
reason, and the import goes on.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import re
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, Literal, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from graph.events import (Event, Interaction, InteractionFacts, ItemUpserted, Order, OrderFacts, OrderLine, Rejected,
                          parse_event)
from graph.store import GraphStore

if TYPE_CHECKING:
    import multiprocessing

__all__ = ["BadRow", "CatalogColumns", "CsvMapping", "DataConfig", "ImportReport", "Imported", "Sourced",
           "import_into", "in_time_order", "read_events", "read_source", "read_source_in_process"]

_FIELD = re.compile(r"\{([^{}]+)\}")


class CatalogColumns(BaseModel):
    """Columns of a separate catalog file (one row per item), read before the order lines."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    title: str
    description: str | None = None
    category: str | None = None
    price: str | None = None
    ts: str = Field("1970-01-01T00:00:00Z", description="time of the catalog's upserts (ISO 8601)")
    skip_if: dict[str, list[str]] = Field(default_factory=dict,
                                          description="items whose column holds one of these values are not products: "
                                                      "their order lines are dropped")


class CsvMapping(BaseModel):
    """Which column (a name) or columns (a ``{name}`` template) of a CSV export give each event field."""

    model_config = ConfigDict(extra="forbid")

    order_id: str
    item_id: str
    ts: str
    user_id: str | None = None
    quantity: str | None = None
    price: str | None = Field(None, description="unit price")
    title: str | None = Field(None, description="item title on the order line (upserts the item when it changes)")
    description: str | None = None
    category: str | None = None
    ts_format: str = Field("iso", description="'iso' (ISO 8601), 'epoch' (seconds) or a strptime pattern")
    timezone: str = Field("UTC", description="zone of times without an offset")
    cancel_if: dict[str, list[str]] = Field(default_factory=dict,
                                            description="an order whose first row holds one of these values in the "
                                                        "column is a cancellation of the order with its id")
    cancel_prefix: str | None = Field(None, description="order ids starting with it are cancellations (Online "
                                                        "Retail's 'C'); the id is kept whole, so such a row cancels "
                                                        "the order of that id")
    trim_suffix: dict[str, str] = Field(default_factory=dict, description="column → suffix removed from its values "
                                                                          "(e.g. '.0' of ids exported as floats)")
    skip_if: dict[str, list[str]] = Field(default_factory=dict,
                                          description="order lines whose column holds one of these values are dropped "
                                                      "(fees, postage)")
    catalog: CatalogColumns | None = Field(None, description="columns of data.catalog_path, when items come from "
                                                             "their own file")
    interleaved_rows: int = Field(1000, ge=0, description="an order id that comes back within this many rows of "
                                                         "its last row continues that order (exports sorted by time "
                                                         "interleave the lines of orders placed together); further "
                                                         "on it is a repeat, counted once; 0: consecutive rows only")
    delimiter: str = Field(",", min_length=1, max_length=1, description="';' for many European exports")
    encoding: str = Field("utf-8", description="the file's text encoding (a leading byte-order mark is dropped)")
    decimal: Literal[".", ","] = Field(".", description="decimal mark of prices and quantities; with ',' a '.' "
                                                        "may group thousands ('1.234,50')")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class DataConfig(BaseModel):
    """The shop's data to import (the ``data:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(Path("../shared/data/online_retail_ii/online_retail_ii.csv.gz"),
                       description="the dataset file `build-graph`, `train` and `replay` read (gzip is read as such)")
    format: Literal["csv", "jsonl"] = Field("csv", description="csv (through `mapping`) or jsonl (the wire events, one per line)")
    mapping: Path | CsvMapping | None = Field(
        Path("configs/mappings/online_retail_ii.yaml"),
        description="for csv: a mapping, or the path of a YAML file holding one")
    catalog_path: Path | None = Field(None, description="a separate catalog file (see mapping.catalog)")

    def csv_mapping(self) -> CsvMapping:
        """The CSV mapping, read from its file if it is a path."""
        if isinstance(self.mapping, CsvMapping):
            return self.mapping
        if self.mapping is None:
            raise ValueError("data.format is csv but data.mapping is not set: name a mapping file "
                             "(e.g. configs/mappings/online_retail_ii.yaml) or write one inline")
        try:
            raw = yaml.safe_load(Path(self.mapping).read_text())
            return CsvMapping.model_validate(raw)
        except OSError as exc:
            raise ValueError(f"data.mapping: cannot read {self.mapping}: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
            raise ValueError(f"data.mapping {self.mapping}: {problems}") from exc


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that could not be turned into an event."""

    line: int
    reason: str
    raw: str

    def as_json(self, source: Path) -> str:
        return json.dumps({"source": str(source), "line": self.line, "reason": self.reason, "raw": self.raw[:2000]})


Sourced = tuple[int, "Event | BadRow"]
"""A line number (where the event's first row starts) and what that row gave."""


@dataclass
class ImportReport:
    """What a file held and what was dropped or refused (and why)."""

    rows: int = 0
    orders_placed: int = 0
    orders_cancelled: int = 0
    item_upserts: int = 0
    interactions: int = 0
    bad_rows: int = 0
    items: set[str] = field(default_factory=set)  # distinct item ids in order lines (bounded by the catalog)
    users: set[str] = field(default_factory=set)
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "order_events": self.orders_placed,
            "cancel_events": self.orders_cancelled,
            "item_upserts": self.item_upserts,
            "interactions": self.interactions,
            "distinct_items": len(self.items),
            "distinct_users": len(self.users),
            "bad_rows": self.bad_rows,
            "dropped_lines": dict(self.dropped),
        }


class _Progress(io.RawIOBase):
    """A binary file that moves a progress bar by the bytes read from disk (of a gzip file: compressed bytes)."""

    def __init__(self, raw: io.BufferedReader, bar: tqdm) -> None:
        self.raw, self.bar = raw, bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = self.raw.readinto(buffer)
        self.bar.update(n)
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open(path: Path, encoding: str, progress: bool) -> tuple[io.TextIOBase, tqdm]:
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"read {path.name}",
               disable=None if progress else True)
    raw: io.RawIOBase | io.BufferedIOBase = _Progress(open(path, "rb"), bar)
    binary = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)) if path.name.endswith(".gz") else \
        io.BufferedReader(raw, 1 << 20)
    return io.TextIOWrapper(binary, encoding=encoding, newline=""), bar


class _Field:
    """One mapping field: a column, or a template of columns, read from a row by position."""

    def __init__(self, spec: str, header: dict[str, int], what: str) -> None:
        names = _FIELD.findall(spec) if "{" in spec else [spec]
        missing = [n for n in names if n not in header]
        if missing:
            raise ValueError(f"{what}: no column {missing[0]!r} in the file (columns: {', '.join(header)})")
        self.template = spec if "{" in spec else None
        self.positions = [header[n] for n in names]
        self.names = names
        self.read: Callable[[list[str]], str] = self._template
        if self.template is None:  # the common case, called per row: one lookup, no dict
            at = self.positions[0]
            self.read = lambda row: row[at].strip()

    def _template(self, row: list[str]) -> str:
        assert self.template is not None
        text = self.template.format_map({n: row[p].strip() for n, p in zip(self.names, self.positions)})
        return " ".join(text.split()).strip(" /|-,:;")


class _Clock:
    """Reads the mapping's time format into an aware datetime."""

    def __init__(self, mapping: CsvMapping) -> None:
        self.format, self.zone = mapping.ts_format, ZoneInfo(mapping.timezone)

    def __call__(self, raw: str) -> datetime:
        raw = raw.strip()
        if self.format == "epoch":
            return datetime.fromtimestamp(float(raw), timezone.utc)
        ts = datetime.fromisoformat(raw.replace("Z", "+00:00")) if self.format == "iso" else \
            datetime.strptime(raw, self.format)
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=self.zone)


def _header(reader: csv.reader, path: Path) -> dict[str, int]:  # type: ignore[valid-type]
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty file, no header row") from None
    if header:  # a byte-order mark, as spreadsheet programs write before "CSV UTF-8" exports, is not a column's name
        header[0] = header[0].removeprefix("\ufeff")
    return {name.strip(): k for k, name in enumerate(header)}


class _Catalog:
    """Rows of a separate catalog file as upserts (its columns checked against the header)."""

    def __init__(self, mapping: CsvMapping, header: dict[str, int]) -> None:
        cols = mapping.catalog
        assert cols is not None
        self.fields = {name: _Field(spec, header, f"mapping.catalog.{name}") for name in
                       ("item_id", "title", "description", "category", "price") if (spec := getattr(cols, name))}
        self.skip = {header[c] if c in header else _missing(f"mapping.catalog.skip_if.{c}", c, header): set(v)
                     for c, v in cols.skip_if.items()}
        self.ts = datetime.fromisoformat(cols.ts.replace("Z", "+00:00"))
        self.price_column, self.decimal = cols.price, mapping.decimal

    def value(self, name: str, row: list[str]) -> str:
        return self.fields[name].read(row) if name in self.fields else ""

    def skipped(self, row: list[str]) -> bool:
        return any(row[k].strip() in values for k, values in self.skip.items())

    def upsert(self, row: list[str]) -> ItemUpserted:
        item_id, price = self.value("item_id", row), self.value("price", row)
        return ItemUpserted(item_id=item_id, title=self.value("title", row) or item_id,
                            description=self.value("description", row), category=self.value("category", row) or None,
                            price=_number(price, self.price_column, self.decimal) if price else None, ts=self.ts)


def _catalog_events(path: Path, mapping: CsvMapping, report: ImportReport, skipped: set[str],
                    progress: bool) -> Iterator[Sourced]:
    """Upserts of a separate catalog file; ``skipped`` collects the items that are not products."""
    fh, bar = _open(path, mapping.encoding, progress)
    with fh, bar:
        reader = csv.reader(fh, delimiter=mapping.delimiter)
        catalog = _Catalog(mapping, _header(reader, path))
        for row in reader:
            line = reader.line_num
            try:
                if catalog.skipped(row):
                    skipped.add(catalog.value("item_id", row))
                    continue
                event = catalog.upsert(row)
            except (IndexError, ValueError, ValidationError) as exc:
                report.bad_rows += 1
                yield line, BadRow(line, f"catalog row: {_why(exc)}", mapping.delimiter.join(row))
                continue
            report.item_upserts += 1
            yield line, event


def _missing(what: str, column: str, header: dict[str, int]) -> int:
    raise ValueError(f"{what}: no column {column!r} in the file (columns: {', '.join(header)})")


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']}" for e in exc.errors(include_url=False))
    if isinstance(exc, IndexError):
        return "too few columns"
    return str(exc)


def _nothing(row: list[str]) -> str:
    return ""


_COMMA_NUMBER = re.compile(r"[-+]?(\d{1,3}(\.\d{3})+|\d*)(,\d+)?")
"""A number written with a decimal comma, its thousands grouped by dots or not ("1.234,50", "1234,5", "2")."""


def _number(raw: str, column: str | None, decimal: str = ".") -> float:
    """``raw`` as a finite float; ``decimal`` is the mapping's decimal mark. A number that does not read is an
    error naming its column, never a guess: with ',' a "2.55" (dots only between groups of three) is refused, not
    read as 255; with '.' a "2,55" is refused with a hint at ``mapping.decimal``."""
    text = raw
    if decimal == ",":
        text = raw.strip()
        if _COMMA_NUMBER.fullmatch(text) is None:
            raise ValueError(f"{column}: {raw!r} is not a number with a decimal comma (mapping.decimal is ',')")
        text = text.replace(".", "").replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        hint = " (a decimal comma? set mapping.decimal: ',')" if re.fullmatch(r"[-+]?\d+,\d+", text.strip()) else ""
        raise ValueError(f"{column}: {raw!r} is not a number{hint}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{column}: {raw!r} is not a finite number")
    return value


def _skipped(row: list[str], skip: list[tuple[int, frozenset[str]]]) -> bool:
    """Whether a column of ``row`` holds one of its listed values."""
    for k, values in skip:
        if row[k].strip() in values:
            return True
    return False


class _Lines:
    """Order lines of a CSV export, turned into events an order (its rows, :class:`_Open`) at a time."""

    def __init__(self, mapping: CsvMapping, header: dict[str, int], skipped: set[str], report: ImportReport) -> None:
        self.mapping, self.report, self.skipped = mapping, report, skipped
        optional = ("user_id", "quantity", "price", "title", "description", "category")
        self.fields = {name: _Field(spec, header, f"mapping.{name}") for name in ("order_id", "item_id", "ts", *optional)
                       if (spec := getattr(mapping, name))}
        self.get = {name: self.fields[name].read if name in self.fields else _nothing for name in ("order_id", "item_id",
                                                                                             "ts", *optional)}
        self.trim = {header[c] if c in header else _missing(f"mapping.trim_suffix.{c}", c, header): s
                     for c, s in mapping.trim_suffix.items()}
        self.skip = [(header[c] if c in header else _missing(f"mapping.skip_if.{c}", c, header), frozenset(v))
                     for c, v in mapping.skip_if.items()]
        self.cancel = [(header[c] if c in header else _missing(f"mapping.cancel_if.{c}", c, header), frozenset(v))
                       for c, v in mapping.cancel_if.items()]
        self.clock = _Clock(mapping)
        self.described: dict[str, tuple[str, str, str]] = {}  # item → the text last upserted

    def cancels(self, row: list[str]) -> bool:
        """Whether ``row``, an order's first, marks it a cancellation (``mapping.cancel_if``); a row too short to
        say does not (its lines become bad rows)."""
        try:
            return _skipped(row, self.cancel)
        except IndexError:
            return False

    def order(self, rows: list[tuple[int, list[str]]]) -> Iterator[Sourced]:
        """Upserts for changed item texts, then the order (or a BadRow per row that cannot be read)."""
        m, report, get = self.mapping, self.report, self.get
        item_of, quantity_of, price_of, title_of = get["item_id"], get["quantity"], get["price"], get["title"]
        description_of, category_of = get["description"], get["category"]
        skip, skipped, described, dropped = self.skip, self.skipped, self.described, report.dropped
        first_line, first = rows[0]
        order_id = get["order_id"](first)
        prefix = m.cancel_prefix
        cancelled = bool(prefix) and order_id.startswith(prefix) or self.cancels(first)  # type: ignore[arg-type]
        try:
            ts = self.clock(get["ts"](first))
        except ValueError as exc:
            report.bad_rows += len(rows)
            for line, row in rows:
                yield line, BadRow(line, f"{m.ts}: {exc}", m.delimiter.join(row))
            return
        lines: list[OrderLine] = []
        for line, row in rows:
            try:
                item_id = item_of(row)
                if skip and _skipped(row, skip):
                    dropped["skipped_item"] += 1
                    continue
                if item_id in skipped:
                    dropped["not_a_product"] += 1
                    continue
                raw_quantity = quantity_of(row)
                quantity: float = int(raw_quantity) if raw_quantity.isdigit() else \
                    _number(raw_quantity or "1", m.quantity, m.decimal)  # 0.35 (kg) is bought, not dropped
                if quantity == 0 or (quantity < 0 and not cancelled):  # a cancellation's lines may count down
                    dropped["quantity_sign"] += 1
                    continue
                raw_price = price_of(row)
                price = _number(raw_price, m.price, m.decimal) if raw_price else None
                if price is not None and price < 0:
                    dropped["negative_price"] += 1
                    continue
                order_line = OrderLine(item_id=item_id, quantity=abs(quantity), price=price)
            except (IndexError, ValueError, ValidationError) as exc:
                report.bad_rows += 1
                yield line, BadRow(line, _why(exc), m.delimiter.join(row))
                continue
            lines.append(order_line)
            title = title_of(row)
            if not title or cancelled:
                continue
            text = (" ".join(title.split()), description_of(row), category_of(row))
            if described.get(item_id) == text:
                continue
            described[item_id] = text
            try:
                upsert = ItemUpserted(item_id=item_id, title=text[0], description=text[1], category=text[2] or None,
                                      price=price, ts=ts)
            except ValidationError as exc:
                report.bad_rows += 1
                yield line, BadRow(line, f"item text: {_why(exc)}", m.delimiter.join(row))
            else:
                report.item_upserts += 1
                yield line, upsert
        if not lines:
            dropped["empty_order"] += 1
            return
        report.items.update(line.item_id for line in lines)
        user_id = get["user_id"](first) or None
        if user_id is not None:
            report.users.add(user_id)
        try:
            event = Order(order_id=order_id, user_id=user_id, items=lines,
                          status="cancelled" if cancelled else "placed", ts=ts)
        except ValidationError as exc:
            report.bad_rows += 1
            yield first_line, BadRow(first_line, f"order {order_id!r}: {_why(exc)}", m.delimiter.join(first))
            return
        if cancelled:
            report.orders_cancelled += 1
        else:
            report.orders_placed += 1
        yield first_line, event


def _check_columns(cfg: DataConfig, mapping: CsvMapping) -> None:
    """Read the headers and check every column the mapping names (raises ValueError naming the first missing)."""
    files: list[tuple[Path, object]] = [(cfg.path, lambda h: _Lines(mapping, h, set(), ImportReport()))]
    if mapping.catalog is not None and cfg.catalog_path is not None:
        files.append((cfg.catalog_path, lambda h: _Catalog(mapping, h)))
    for path, check in files:
        fh, bar = _open(path, mapping.encoding, False)
        with fh, bar:
            check(_header(csv.reader(fh, delimiter=mapping.delimiter), path))  # type: ignore[operator]


def _csv_events(cfg: DataConfig, mapping: CsvMapping, report: ImportReport, progress: bool) -> Iterator[Sourced]:
    skipped: set[str] = set()
    if mapping.catalog is not None:
        assert cfg.catalog_path is not None
        yield from _catalog_events(cfg.catalog_path, mapping, report, skipped, progress)
    fh, bar = _open(cfg.path, mapping.encoding, progress)
    with fh, bar:
        reader = csv.reader(fh, delimiter=mapping.delimiter)
        lines = _Lines(mapping, _header(reader, cfg.path), skipped, report)
        order_id = lines.get["order_id"]
        trim = lines.trim
        open_orders: dict[str, _Open] = {}  # least recently continued first
        window = mapping.interleaved_rows
        group = _Open()
        current: str | None = None
        for row in reader:
            report.rows += 1
            for k, suffix in trim.items():
                if k < len(row) and row[k].endswith(suffix):
                    row[k] = row[k][: -len(suffix)]
            try:
                key = order_id(row)
            except IndexError:
                report.bad_rows += 1
                yield reader.line_num, BadRow(reader.line_num, "too few columns", mapping.delimiter.join(row))
                continue
            if key != current:  # a run of rows begins: a new order, or more of one still open
                group.last, current = report.rows - 1, key  # the run that ended
                while open_orders and (stale := next(iter(open_orders.values()))).last < report.rows - 1 - window:
                    yield from lines.order(open_orders.pop(stale.key).rows)
                cancels = lines.cancels(row)
                if cancels and key in open_orders and not open_orders[key].cancels:
                    # a cancellation of the open order, not more of its lines: that order is whole, and so is every
                    # order last continued before it
                    while (first := next(iter(open_orders))) != key:
                        yield from lines.order(open_orders.pop(first).rows)
                    yield from lines.order(open_orders.pop(key).rows)
                group = open_orders.pop(key, None) or _Open(key, cancels=cancels)
                open_orders[key] = group  # last continued: to the end
                append = group.rows.append
            append((reader.line_num, row))
        for group in open_orders.values():
            yield from lines.order(group.rows)


@dataclass(slots=True)
class _Open:
    """An order whose rows may still come: its rows so far, the row count at its last one, and whether its first
    row marks it a cancellation (``mapping.cancel_if``)."""

    key: str = ""
    rows: list[tuple[int, list[str]]] = field(default_factory=list)
    last: int = 0
    cancels: bool = False


def _jsonl_events(cfg: DataConfig, report: ImportReport, progress: bool) -> Iterator[Sourced]:
    fh, bar = _open(cfg.path, "utf-8-sig", progress)  # "-sig": a leading byte-order mark is dropped
    with fh, bar:
        for line, text in enumerate(fh, 1):
            report.rows += 1
            if not text.strip():
                continue
            event = parse_event(text.encode())
            if isinstance(event, Rejected):
                report.bad_rows += 1
                yield line, BadRow(line, event.reason, text.rstrip("\n"))
                continue
            if isinstance(event, Order):
                report.orders_cancelled += event.status == "cancelled"
                report.orders_placed += event.status == "placed"
                report.items.update(event.item_ids)
                if event.user_id:
                    report.users.add(event.user_id)
            elif isinstance(event, ItemUpserted):
                report.item_upserts += 1
            elif isinstance(event, Interaction):
                report.interactions += 1
            yield line, event


def read_source(cfg: DataConfig, report: ImportReport | None = None, progress: bool = False) -> Iterator[Sourced]:
    """``(line, event or BadRow)`` of the configured file, in file order, read as a stream.

    Raises ``ValueError`` at once, before any row is read, when a file is missing or the mapping names a
    column the file does not have.
    """
    report = report if report is not None else ImportReport()
    for path in (cfg.path, cfg.catalog_path):
        if path is not None and not Path(path).exists():
            raise ValueError(f"dataset not found: {path}")
    if cfg.format == "jsonl":
        return _jsonl_events(cfg, report, progress)
    mapping = cfg.csv_mapping()
    if (mapping.catalog is None) != (cfg.catalog_path is None):
        raise ValueError("data.catalog_path and data.mapping's catalog section go together: "
                         + ("data.catalog_path is not set" if cfg.catalog_path is None else
                            "the mapping has no catalog section naming the catalog file's columns"))
    _check_columns(cfg, mapping)
    return _csv_events(cfg, mapping, report, progress)


def _read_in_process(cfg: DataConfig, queue: multiprocessing.Queue, progress: bool, chunk: int) -> None:
    """A reader process: ``(line, event)`` rows in chunks on ``queue``, orders as their facts, then the report."""
    report = ImportReport()
    rows: list[Sourced] = []
    try:
        for line, event in read_source(cfg, report, progress):
            rows.append((line, event.facts() if isinstance(event, Order) else event))
            if len(rows) >= chunk:
                queue.put(("rows", rows))
                rows = []
        queue.put(("rows", rows))
        queue.put(("done", report))
    except Exception as exc:  # reported to the importing process, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def read_source_in_process(cfg: DataConfig, report: ImportReport, progress: bool = False,
                           chunk: int = 20_000) -> Iterator[Sourced]:
    """:func:`read_source` run in a second process, so reading and applying use both cores; orders come as
    :class:`~graph.events.OrderFacts` (what the graph store takes; cheap to hand between processes).

    A wrong mapping or a missing file raises here, before the process starts.
    """
    import multiprocessing
    import queue as queues

    read_source(cfg, ImportReport())  # checks files and columns now (the generator it returns is not run)
    ctx = multiprocessing.get_context("spawn")
    channel = ctx.Queue(maxsize=4)
    reader = ctx.Process(target=_read_in_process, args=(cfg, channel, progress, chunk), daemon=True,
                         name="bundlegnn-reader")
    reader.start()

    def rows() -> Iterator[Sourced]:
        try:
            while True:
                try:
                    kind, payload = channel.get(timeout=1.0)
                except queues.Empty:
                    if not reader.is_alive():
                        raise RuntimeError(f"the reader process exited with {reader.exitcode}") from None
                    continue
                if kind == "rows":
                    yield from payload
                elif kind == "done":
                    for name in vars(payload):
                        setattr(report, name, getattr(payload, name))
                    return
                else:
                    raise ValueError(payload)
        finally:
            reader.join(5)
            if reader.is_alive():
                reader.terminate()

    return rows()


def read_events(cfg: DataConfig | str | os.PathLike[str], report: ImportReport | None = None,
                progress: bool = False) -> Iterator[Event]:
    """The events of a dataset in file order, bad rows left out (counted in ``report``).

    ``cfg``: a :class:`DataConfig`, or the path of an Online Retail II layout CSV.
    """
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig(path=Path(cfg))
    for _, event in read_source(cfg, report, progress):
        if not isinstance(event, BadRow):
            yield event


class EventSpool:
    """Events written once to a local file, orders and interactions as their facts (:class:`~graph.events.OrderFacts`,
    :class:`~graph.events.InteractionFacts`), and read
    back on every later pass (calling the spool gives a fresh iterator, as :data:`training.protocol.Events`
    asks).

    Training reads its dataset four times (the order check, the time split's two passes, the store of every
    event after training). Parsing the CSV costs about 13 µs a row (Online Retail II full, 1 M rows: 13 s a
    pass; its 40× scale-up, 42.7 M rows: about 9 minutes a pass), reading an order's facts back from a pickle
    about 0.5 µs. The file lives in ``directory`` (the state dir, not a RAM-backed /tmp) and is removed by
    :meth:`close` or when the spool is garbage-collected.
    """

    def __init__(self, directory: Path, chunk: int = 20_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="events-", suffix=".spool", dir=directory)
        self.path = Path(name)
        self._remove = weakref.finalize(self, self.path.unlink, missing_ok=True)
        self._out: BinaryIO | None = os.fdopen(fd, "wb")
        self._chunk: list[Event | OrderFacts | InteractionFacts] = []
        self.size, self.events = chunk, 0

    def add(self, event: Event | OrderFacts | InteractionFacts) -> None:
        """Append one event, an order or interaction as it is or as its facts (only before :meth:`seal`)."""
        if self._out is None:
            raise RuntimeError("the spool is sealed: events are added before it is read")
        self._chunk.append(event.facts() if isinstance(event, (Order, Interaction)) else event)
        self.events += 1
        if len(self._chunk) == self.size:
            pickle.dump(self._chunk, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._chunk = []

    def seal(self) -> "EventSpool":
        """Write what is pending and close the file for writing; the spool can be read from now on."""
        if self._out is not None:
            if self._chunk:
                pickle.dump(self._chunk, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._out.close()
            self._out, self._chunk = None, []
        return self

    def __call__(self) -> Iterator[Event | OrderFacts | InteractionFacts]:
        if self._out is not None:
            raise RuntimeError("the spool is still being written: seal() it first")
        with self.path.open("rb") as fh:
            while True:
                try:
                    chunk = pickle.load(fh)
                except EOFError:
                    return
                yield from chunk

    def close(self) -> None:
        """Remove the file."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self._remove()


def in_time_order(events: Iterator[Event] | list[Event]) -> list[Event]:
    """Events sorted by time; equal times keep their order (an item's upsert stays before its order)."""
    return sorted(events, key=lambda e: e.epoch)


@dataclass
class Imported:
    """What :func:`import_into` did: events applied, changed the graph, refused (dead letters)."""

    events: int = 0
    changed: int = 0
    refused: int = 0
    bad_rows: int = 0


def import_into(store: GraphStore, source: Iterator[Sourced], dead_letters: TextIO | None = None,
                origin: Path | None = None, batch: int = 100_000, batch_pairs: int = 30_000_000) -> Imported:
    """Apply a source's events to ``store`` in batches; rows that are not events and events the store refuses
    go to ``dead_letters`` (JSON lines: source, line, reason, raw) with their line number.

    Large batches are cheaper: pairs repeated within a batch are summed before they reach the edge tables
    (Online Retail II ×4: 29 s with 20k events a batch, 20 s with 100k; ×10: 71 s with 15 M pairs a batch,
    54 s with 40 M). ``batch_pairs`` bounds a batch's co-purchase pairs, which bounds the memory its bulk
    update takes (about 40 bytes a pair: ×40 peaked at 11.0 GB with 40 M).
    """
    done = Imported()
    chunk: list[Sourced] = []

    def flush() -> None:
        events = [(line, e) for line, e in chunk if not isinstance(e, BadRow)]
        for line, bad in chunk:
            if isinstance(bad, BadRow):
                done.bad_rows += 1
                if dead_letters is not None:
                    dead_letters.write(bad.as_json(origin or Path("?")) + "\n")
        results = store.apply_many([e for _, e in events])
        done.events += len(events)
        for (line, event), result in zip(events, results):
            done.changed += result.changed
            if result.rejected:
                done.refused += 1
                if dead_letters is not None:
                    raw = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event._asdict())
                    dead_letters.write(BadRow(line, result.note, raw).as_json(origin or Path("?")) + "\n")
        chunk.clear()

    pairs = 0
    for item in source:
        chunk.append(item)
        event = item[1]
        if isinstance(event, (Order, OrderFacts)):
            n = len(event.item_ids)
            pairs += n * (n - 1) // 2
        if len(chunk) >= batch or pairs >= batch_pairs:
            flush()
            pairs = 0
    flush()
    return done
