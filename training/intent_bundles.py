"""The Amazon intent bundles as events and a time split of their bundles.

Bundles marked by people in real Amazon purchase sessions, each with a
written intent, every bundle item with its title and category path (Sun et
al., "Revisiting Bundle Recommendation: Datasets, Tasks, Challenges and
Opportunities for Intent-Aware Product Bundling", SIGIR 2022; the data's
README in ``shared/data/amazon_intent_bundles``). A session mixes bundles
(1.9 per session on average) with items of no bundle, so "bought in the same
session" is not "belongs to the same bundle": the bundle task asks for the
set, not for the basket.

Events: the titled items as catalog upserts (text = title and category
path), every training session as an order of its user, and every training
bundle as one more order (``bundle:<id>``): bundles are extra co-purchase
evidence. The dataset's user–item rows are exactly its bundles' members per
user, so they enter as those bundle orders (a test bundle's would give its
members away). Items of sessions without a title enter through their orders
and have no text.
"""

from __future__ import annotations

import csv
import gzip
import html
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from graph.events import EARLIEST, ItemUpserted, Order, OrderLine
from training.titles import title_overlap

DOMAINS = ("electronic", "clothing", "food")

Event = ItemUpserted | Order


@dataclass(frozen=True)
class RealBundle:
    """One bundle people marked in a purchase session."""

    bundle_id: str
    items: tuple[str, ...]
    intent: str
    user_id: str
    session_id: str
    epoch: float


@dataclass(frozen=True)
class Session:
    session_id: str
    user_id: str
    epoch: float
    items: tuple[str, ...]


def category_path(raw: str) -> tuple[str, ...]:
    """An item's most specific category path (the deepest of those it lists; the first of equals):
    ``"[[Clothing, Shoes & Jewelry,Jewelry Outlet],[Clothing, Shoes & Jewelry,Women,Shoes]]"`` →
    ``("Clothing, Shoes & Jewelry", "Women", "Shoes")``. Names are not quoted and may hold ", " (a comma
    followed by a space), which a separator never does; the shallow paths are shop sections ("Jewelry Outlet",
    "Shoes & Accessories: International Shipping Available")."""
    inner = raw.strip().removeprefix("[[").removesuffix("]]")
    paths = []
    for one in inner.split("],["):
        parts: list[str] = []
        for piece in one.split(","):
            if parts and piece.startswith(" "):
                parts[-1] += "," + piece
            elif piece.strip():
                parts.append(piece.strip())
        paths.append(tuple(parts))
    return max(paths, key=len)


def _rows(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)  # header
        return [row for row in reader if row]


@dataclass
class IntentBundles:
    """One domain of the dataset."""

    domain: str
    titles: dict[str, str]
    paths: dict[str, tuple[str, ...]]
    sessions: list[Session]  # in time order
    bundles: list[RealBundle]  # in time order

    @classmethod
    def read(cls, folder: str | Path) -> "IntentBundles":
        """Read a domain folder (``.../amazon_intent_bundles/electronic``)."""
        folder = Path(folder)
        missing = [f for f in ("bundle_item", "bundle_intent", "session_item", "session_bundle", "user_session",
                               "item_titles", "item_categories") if not (folder / f"{f}.csv.gz").is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not an intent-bundles domain folder: no {', '.join(missing)}.csv.gz")
        members: dict[str, list[str]] = defaultdict(list)
        for b, i in _rows(folder / "bundle_item.csv.gz"):
            members[b].append(i)
        intents = {b: text for b, text in _rows(folder / "bundle_intent.csv.gz")}
        owner = {s: (u, float(t)) for u, s, t in _rows(folder / "user_session.csv.gz")}
        items: dict[str, list[str]] = defaultdict(list)
        for s, i in _rows(folder / "session_item.csv.gz"):
            items[s].append(i)
        sessions = sorted((Session(s, *owner[s], tuple(dict.fromkeys(v))) for s, v in items.items() if s in owner),
                          key=lambda x: (x.epoch, int(x.session_id)))
        bundles = sorted((RealBundle(b, tuple(dict.fromkeys(members[b])), intents.get(b, ""), *owner[s][:1], s,
                                     owner[s][1]) for s, b in _rows(folder / "session_bundle.csv.gz") if s in owner),
                         key=lambda x: (x.epoch, int(x.bundle_id)))
        titles = {i: html.unescape(t).strip() for i, t in _rows(folder / "item_titles.csv.gz") if t.strip()}
        paths = {i: category_path(c) for i, c in _rows(folder / "item_categories.csv.gz")}
        return cls(folder.name, titles, paths, sessions, bundles)

    def leaf(self, item_id: str) -> str | None:
        path = self.paths.get(item_id)
        return path[-1] if path else None

    def split(self, test_frac: float = 0.2) -> tuple[list[RealBundle], list[RealBundle], float]:
        """Training and test bundles by time, and the cut: a bundle (and a session) dated at or after the cut
        is test; the cut is the date of the bundle at the ``1 - test_frac`` quantile (dates are days, so a
        day is never split)."""
        if not self.bundles:
            raise ValueError(f"{self.domain}: no bundles")
        cut = self.bundles[min(int(len(self.bundles) * (1 - test_frac)), len(self.bundles) - 1)].epoch
        return [b for b in self.bundles if b.epoch < cut], [b for b in self.bundles if b.epoch >= cut], cut

    def events(self, cut: float) -> list[Event]:
        """The catalog, then the sessions and bundles dated before ``cut`` as orders, in time order."""
        catalog: list[Event] = [
            ItemUpserted(ts=EARLIEST, item_id=i, title=t[:1000], description=" > ".join(self.paths.get(i, ())),
                         category=(self.leaf(i) or "")[:256] or None)
            for i, t in sorted(self.titles.items())]
        orders = [(s.epoch, 0, Order(ts=_utc(s.epoch), order_id=f"session:{s.session_id}", user_id=f"u{s.user_id}",
                                     items=[OrderLine(item_id=i) for i in s.items]))
                  for s in self.sessions if s.epoch < cut]
        orders += [(b.epoch, 1, Order(ts=_utc(b.epoch), order_id=f"bundle:{b.bundle_id}", user_id=f"u{b.user_id}",
                                      items=[OrderLine(item_id=i) for i in b.items]))
                   for b in self.bundles if b.epoch < cut]
        return catalog + [o for *_, o in sorted(orders, key=lambda x: (x[0], x[1], x[2].order_id))]

    def interchangeable(self, a: str, b: str, min_title_similarity: float = 0.5) -> bool:
        """The data's label of two items one would buy *instead of* each other: the same category leaf and
        near-identical titles (word-set Jaccard ≥ ``min_title_similarity``). Made from the data alone, for
        measuring; the builder's substitute detector never reads it."""
        la, lb = self.leaf(a), self.leaf(b)
        return la is not None and la == lb and title_overlap(self.titles.get(a, ""), self.titles.get(b, "")) >= \
            min_title_similarity


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)
