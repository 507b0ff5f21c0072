"""What an import reads (the ``data:`` section and the CSV mappings) and what it reports (bad rows, counts).

Shared by the file readers (:mod:`training.readers`) and the import itself (:mod:`training.datasets`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from graph.events import Event

__all__ = ["BadRow", "CatalogColumns", "CsvMapping", "DataConfig", "ImportReport", "Sourced"]


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


Sourced = tuple[int, Event | BadRow]
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
