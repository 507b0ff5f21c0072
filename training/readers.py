"""The two kinds of file an import reads, row by row, as events: CSV through a :class:`CsvMapping`, and JSON
lines of the wire events (see :mod:`training.datasets`, which picks one by ``data.format``).

A row that cannot be read becomes a :class:`BadRow` with its line number and the reason, and the reader goes
on; the :class:`ImportReport` counts what each file held and what was dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from zoneinfo import ZoneInfo

from pydantic import ValidationError
from tqdm import tqdm

from graph.events import Interaction, ItemUpserted, Order, OrderLine, Rejected, parse_event
from training.data_config import BadRow, CsvMapping, DataConfig, ImportReport, Sourced

__all__ = ["check_columns", "csv_events", "jsonl_events"]

_FIELD = re.compile(r"\{([^{}]+)\}")


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


def check_columns(cfg: DataConfig, mapping: CsvMapping) -> None:
    """Read the headers and check every column the mapping names (raises ValueError naming the first missing)."""
    files: list[tuple[Path, object]] = [(cfg.path, lambda h: _Lines(mapping, h, set(), ImportReport()))]
    if mapping.catalog is not None and cfg.catalog_path is not None:
        files.append((cfg.catalog_path, lambda h: _Catalog(mapping, h)))
    for path, check in files:
        fh, bar = _open(path, mapping.encoding, False)
        with fh, bar:
            check(_header(csv.reader(fh, delimiter=mapping.delimiter), path))  # type: ignore[operator]


def csv_events(cfg: DataConfig, mapping: CsvMapping, report: ImportReport, progress: bool) -> Iterator[Sourced]:
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


def jsonl_events(cfg: DataConfig, report: ImportReport, progress: bool) -> Iterator[Sourced]:
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
