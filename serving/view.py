"""The API's in-memory view: catalog, published complement lists, recent user items.

Everything here is fed from Kafka (``catalog``, ``bundle-updates``,
``orders``, ``interactions``; see :mod:`serving.feed`) and, at start-up,
from a model artifact, so a lookup is a few dictionary reads. A replica keeps
no state of its own: start another and it reads the same topics.

Each published list is kept with a *relevance* per complement in (0, 1], the
anchor's best complement being 1, so lists from different sources can be
compared: for a model list (softmax-trained logits) ``exp(s - s_max)``, the
probability ratio to the best; for decoder, co-purchase and similar-text lists
(regression weights and cosines, already on a ratio scale) ``s / s_max``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from graph.events import ItemUpserted
from training.complements import BundleUpdate, Complement, model_logits, unit
from training.titles import title_words


@dataclass(frozen=True)
class ItemInfo:
    """What the catalog says about an item."""

    item_id: str
    title: str
    category: str | None = None
    price: float | None = None
    in_stock: bool = True


@dataclass(frozen=True)
class Entry:
    """One item's latest published complement list."""

    complements: tuple[Complement, ...]
    relevance: dict[str, float]
    substitutes: frozenset[str]
    model_version: str | None
    updated_at: datetime | None
    received_at: float
    orders: int | None = None  # placed orders holding the item, as the worker last published


class TitleIndex:
    """The catalog's lowercased titles, for substring search by people (the bundle explorer's ``GET /items``).

    The titles are also kept joined in one string, one per line, so that a
    word is found by one regular-expression scan in C: 2 to 12 ms at 212k
    items, by how many titles hold it, where a Python test per title took
    11 to 17 ms. Titles are added by the feed thread and the string catches
    up at the next search: new titles are appended, a changed one rebuilds
    it. Items are never removed.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lowered: list[str] = []
        self.rows: dict[str, int] = {}
        self._text = ""
        self._starts = np.zeros(0, np.int64)  # where each covered title begins in _text
        self._covered = 0
        self._stale = False
        self._lock = threading.Lock()  # searches run on several threads of the server's pool

    def set(self, item_id: str, title: str) -> None:
        row = self.rows.get(item_id)
        if row is None:
            self.ids.append(item_id)  # the id before its title: a reader covers at most len(lowered) rows
            self.lowered.append(title.lower())
            self.rows[item_id] = len(self.ids) - 1
        else:
            self.lowered[row] = title.lower()
            self._stale = True

    def catch_up(self) -> None:
        """Join the titles added so far (the next search would)."""
        self._joined()

    def _joined(self) -> tuple[str, np.ndarray]:
        with self._lock:
            if self._stale:  # cleared before the titles are read: a change from now on marks it again
                self._stale, self._text, self._starts, self._covered = False, "", np.zeros(0, np.int64), 0
            end = len(self.lowered)
            if self._covered < end:
                new = self.lowered[self._covered:end]
                lengths = np.fromiter((len(t) + 1 for t in new), np.int64, len(new))  # (+1: the newline)
                self._starts = np.concatenate([self._starts, len(self._text) + np.cumsum(lengths) - lengths])
                self._text += "\n".join(new) + "\n"
                self._covered = end
            return self._text, self._starts

    def search(self, words: list[str]) -> list[str]:
        """Ids of the items whose title holds every one of ``words`` (lowercase, without whitespace)."""
        if not words:
            return []
        text, starts = self._joined()
        first = max(words, key=len)  # the scan finds the longest word's titles (a long word is rarer), ...
        rest = [w for w in words if w != first]  # ... and those are tested for the others
        found = np.fromiter((m.start() for m in re.finditer(re.escape(first), text)), np.int64)
        rows = np.unique(np.searchsorted(starts, found, side="right") - 1).tolist()
        return [self.ids[r] for r in rows if all(w in self.lowered[r] for w in rest)]


def relevance(complements: tuple[Complement, ...] | list[Complement]) -> dict[str, float]:
    """Normalised relevance of each complement (see the module docstring)."""
    if not complements:
        return {}
    top = max(c.score for c in complements)
    if complements[0].source == "model":
        return {c.item_id: math.exp(c.score - top) for c in complements}
    return {c.item_id: (c.score / top if top > 0 else 0.0) for c in complements}


@dataclass
class BundleView:
    """Catalog, complement lists and user histories, safe to read while a feed thread writes."""

    max_users: int = 100_000
    items_per_user: int = 50
    items: dict[str, ItemInfo] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)  # item → bumped on any change (cache validation)
    users: OrderedDict[str, deque[str]] = field(default_factory=OrderedDict)
    model_version: str | None = None
    last_update: float | None = None  # when the newest bundle update arrived (epoch s)
    counters: dict[str, int] = field(default_factory=lambda: {"catalog": 0, "updates": 0, "user_events": 0,
                                                              "rejected": 0})
    word_items: Counter[str] = field(default_factory=Counter)  # title word → catalog items whose title holds it
    titles: TitleIndex = field(default_factory=lambda: TitleIndex(), repr=False)  # what :meth:`search` scans
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _bump(self, item_id: str) -> None:
        self.versions[item_id] = self.versions.get(item_id, 0) + 1

    # ---- writers (the feed thread, start-up) ---------------------------------
    def upsert_item(self, event: ItemUpserted) -> None:
        self.set_item(ItemInfo(event.item_id, event.title, event.category, event.price, event.in_stock))
        self.counters["catalog"] += 1

    def set_item(self, info: ItemInfo) -> None:
        """Add or replace a catalog item, keeping :attr:`word_items` (what :meth:`rarity` reads) and
        :attr:`titles` in step (the item is in :attr:`items` before a search can find it)."""
        old = self.items.get(info.item_id)
        self.items[info.item_id] = info
        if old is None or old.title != info.title:
            if old is not None:
                self.word_items.subtract(title_words(old.title))
            self.word_items.update(title_words(info.title))
            self.titles.set(info.item_id, info.title)
        self._bump(info.item_id)

    def apply_update(self, update: BundleUpdate, received_at: float | None = None) -> None:
        comps = tuple(update.complements)
        self.entries[update.item_id] = Entry(comps, relevance(comps), frozenset(update.substitutes),
                                             update.model_version, update.updated_at, received_at or time.time(),
                                             update.orders)
        self._bump(update.item_id)
        if update.model_version is not None:
            self.model_version = update.model_version
        self.last_update = received_at or time.time()
        self.counters["updates"] += 1

    def add_user_items(self, user_id: str, item_ids: list[str]) -> None:
        with self._lock:
            history = self.users.pop(user_id, None) or deque(maxlen=self.items_per_user)
            history.extend(i for i in item_ids if i not in history)
            self.users[user_id] = history
            while len(self.users) > self.max_users:
                self.users.popitem(last=False)
        self.counters["user_events"] += 1

    def seed_from_model(self, version: str, item_ids: list[str], src: np.ndarray, dst: np.ndarray,
                        prior: np.ndarray, temperature: float, top_k: int,
                        decoder: tuple[list[str], np.ndarray, np.ndarray] | None = None) -> int:
        """Model-only complement lists for items no bundle update has covered yet; returns how many.

        With ``decoder`` (an artifact's ``(item ids, indices, weights)``, over
        ``item_ids``) the lists are its rows, as the worker would publish them
        before any new order; otherwise the views' logits."""
        rows = [r for r, k in enumerate(item_ids) if k not in self.entries]
        if decoder is not None:
            _, index, weight = decoder
            for r in rows:
                keep = (weight[r] > 0) & (index[r] != r)
                comps = [Complement(item_id=item_ids[b], score=round(float(w), 6), orders=0,
                                    model_score=round(float(w), 6), source="decoder")
                         for b, w in zip(index[r][keep][:top_k].tolist(), weight[r][keep][:top_k].tolist())]
                self._seed(item_ids[r], comps, version)
        else:
            src, dst = unit(src), unit(dst)
            for start in range(0, len(rows), 1024):
                chunk = np.array(rows[start:start + 1024])
                logits = model_logits(src[chunk], dst, prior, temperature)
                logits[np.arange(len(chunk)), chunk] = -np.inf
                kk = min(top_k, logits.shape[1] - 1)
                top = np.argpartition(-logits, kk - 1, axis=1)[:, :kk]
                for i, r in enumerate(chunk):
                    best = top[i][np.argsort(-logits[i, top[i]], kind="stable")]
                    self._seed(item_ids[r], [Complement(item_id=item_ids[b], score=round(float(logits[i, b]), 6), orders=0,
                                                        model_score=round(float(logits[i, b]), 6), source="model")
                                             for b in best], version)
        self.model_version = self.model_version or version
        return len(rows)

    def _seed(self, item_id: str, comps: list[Complement], version: str) -> None:
        self.entries[item_id] = Entry(tuple(comps), relevance(comps), frozenset(), version, None, time.time())
        self._bump(item_id)

    # ---- readers (request handlers) -----------------------------------------
    def knows(self, item_id: str) -> bool:
        return item_id in self.items or item_id in self.entries

    def info(self, item_id: str) -> ItemInfo:
        return self.items.get(item_id) or ItemInfo(item_id, item_id)

    def search(self, words: list[str]) -> list[str]:
        """Catalog items whose title holds every one of ``words`` (lowercase substrings), in arrival order."""
        return self.titles.search(words)

    def rarity(self, word: str) -> float:
        """The inverse document frequency of a title word over the catalog, ``log((n + 1) / (m + 1))`` for
        ``n`` catalog items of which ``m`` hold it in their title (0 for a word every title holds): a word few
        titles share (a brand, a product line) says more about two items than one most titles hold."""
        return math.log((len(self.items) + 1) / (self.word_items.get(word, 0) + 1))

    def relevance(self, a: str, b: str) -> float:
        """How strongly ``a``'s published list recommends ``b`` (0 when it does not list it)."""
        entry = self.entries.get(a)
        return entry.relevance.get(b, 0.0) if entry else 0.0

    def complement(self, a: str, b: str) -> Complement | None:
        entry = self.entries.get(a)
        if entry is not None:
            for c in entry.complements:
                if c.item_id == b:
                    return c
        return None

    def substitutes(self, a: str, b: str) -> bool:
        ea, eb = self.entries.get(a), self.entries.get(b)
        return bool((ea and b in ea.substitutes) or (eb and a in eb.substitutes))

    def history(self, user_id: str | None) -> frozenset[str]:
        if user_id is None:
            return frozenset()
        with self._lock:
            return frozenset(self.users.get(user_id, ()))
