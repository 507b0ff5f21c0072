"""The graph store: items, users and time-decayed edges, updated one event at a time.

Every path that changes the graph — the batch replay of a dataset, the Faust
worker and the tests — calls :meth:`GraphStore.apply`, so they cannot disagree
about what an event means.

Edge weights decay exponentially with a configurable half-life: a co-purchase
``dt`` seconds ago counts ``2 ** (-dt / half_life)`` (kept against a reference
time, see :class:`DecayClock`). Each edge keeps its raw count too, because
explanations ("bought together in 37 orders") quote counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from graph.events import Interaction, ItemUpserted, Order

DAY = 86_400.0


class GraphConfig(BaseModel):
    """Knobs of the graph store (the ``graph:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    half_life_days: float = Field(60.0, gt=0, description="half-life of edge weights")
    interaction_weights: dict[str, float] = Field(
        default_factory=lambda: {"view": 1.0, "cart": 3.0, "purchase": 5.0},
        description="weight one user-item interaction of each kind adds",
    )
    max_order_items: int = Field(
        0, ge=0, description="orders with more distinct items add no co-purchase pairs (0: no limit)"
    )


class DecayClock:
    """Exponential decay against a fixed reference time.

    A weight is kept as it would be at ``ref``: an observation of ``amount``
    at ``ts`` adds ``amount * 2 ** ((ts - ref) / half_life)``, and the weight
    seen at ``now`` is the sum times ``2 ** ((ref - now) / half_life)``. So an
    update is one multiply-add with a factor computed once per event, in any
    arrival order (late events included), instead of re-decaying every edge
    it touches. ``ref`` moves forward (every weight rescaled) before factors
    could overflow.
    """

    __slots__ = ("half_life", "ref")

    MAX_HALF_LIVES = 256.0  # 2**256 is far from float64's limit

    def __init__(self, half_life: float, ref: float | None = None) -> None:
        self.half_life = half_life
        self.ref = ref

    def factor(self, ts: float) -> float:
        """What one unit observed at ``ts`` adds to a reference-time weight."""
        return 2.0 ** ((ts - self.ref) / self.half_life)

    def scale(self, now: float) -> float:
        """Reference-time weights times this are weights seen at ``now``."""
        return 2.0 ** ((self.ref - now) / self.half_life)


class Tally:
    """A count plus a time-decayed weight (kept at its :class:`DecayClock`'s reference time)."""

    __slots__ = ("count", "weight", "ts")

    def __init__(self, count: int = 0, weight: float = 0.0, ts: float = 0.0) -> None:
        self.count = count
        self.weight = weight  # at the clock's reference time
        self.ts = ts  # the newest observation

    def add(self, ts: float, amount: float, sign: int = 1) -> None:
        """Add (``sign=1``) or take back (``sign=-1``) ``amount`` (already scaled by the clock's factor)."""
        self.count += sign
        self.weight += sign * amount
        if ts > self.ts:
            self.ts = ts

    def value(self, now: float, clock: DecayClock) -> float:
        """The weight as seen at time ``now`` (never in the future of its newest observation)."""
        weight = self.weight if self.weight > 0.0 else 0.0  # a full take-back may leave rounding dust
        return weight * clock.scale(now if now > self.ts else self.ts) if weight else 0.0


@dataclass(slots=True)
class Item:
    """Catalog facts of one item. ``has_text`` is False for items seen only in orders."""

    title: str = ""
    description: str = ""
    category: str | None = None
    price: float | None = None
    in_stock: bool = True
    has_text: bool = False
    updated: float = 0.0

    @property
    def text(self) -> str:
        """The text the encoder embeds."""
        return f"{self.title}. {self.description}".strip(". ") if self.description else self.title


@dataclass(slots=True)
class OrderRecord:
    """What an applied order contributed, so a cancellation can take it back exactly."""

    ts: float
    user: int
    items: tuple[int, ...]
    status: str


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of one event: did the graph change, and which items did it touch."""

    changed: bool
    items: tuple[str, ...] = ()
    note: str = ""


class IdMap:
    """A growing bijection between external string ids and dense row numbers."""

    __slots__ = ("index", "ids")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = list(ids)
        self.index: dict[str, int] = {k: i for i, k in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def get(self, key: str) -> int | None:
        return self.index.get(key)

    def add(self, key: str) -> int:
        """The row of ``key``, appending it if new."""
        row = self.index.get(key)
        if row is None:
            row = self.index[key] = len(self.ids)
            self.ids.append(key)
        return row


@dataclass
class Stats:
    """Counters of what the store has seen, for logs, metrics and tests."""

    events: int = 0
    orders_placed: int = 0
    orders_cancelled: int = 0
    cancellations_unmatched: int = 0
    duplicates: int = 0
    placeholder_items: int = 0
    oversized_orders: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class GraphStore:
    """Items, users, co-purchase (item–item) and interaction (user–item) edges."""

    config: GraphConfig = field(default_factory=GraphConfig)
    items: IdMap = field(default_factory=IdMap)
    users: IdMap = field(default_factory=IdMap)
    catalog: list[Item] = field(default_factory=list)
    item_orders: list[Tally] = field(default_factory=list)
    co: list[dict[int, Tally]] = field(default_factory=list)
    ui: list[dict[int, Tally]] = field(default_factory=list)
    orders: dict[str, OrderRecord] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    last_ts: float = 0.0
    version: int = 0
    clock: DecayClock = field(init=False)

    def __post_init__(self) -> None:
        self.clock = DecayClock(self.config.half_life_days * DAY)

    @property
    def half_life(self) -> float:
        return self.clock.half_life

    def _factor(self, ts: float) -> float:
        """The clock's factor at ``ts``; sets the reference at the first event, moves it before overflow."""
        clock = self.clock
        if clock.ref is None:
            clock.ref = ts
        elif (ts - clock.ref) / clock.half_life > clock.MAX_HALF_LIVES:
            self._rebase(ts)
        return clock.factor(ts)

    def _rebase(self, ref: float) -> None:
        """Move the reference time to ``ref``, rescaling every weight (rare: once per 256 half-lives)."""
        scale = self.clock.factor(ref) ** -1
        for tally in self.item_orders:
            tally.weight *= scale
        for rows in (self.co, self.ui):
            for a, nbrs in enumerate(rows):
                for b, tally in nbrs.items():
                    if rows is self.ui or a < b:  # a co-purchase tally is shared by both rows
                        tally.weight *= scale
        self.clock.ref = ref

    # ---- applying events -------------------------------------------------
    def apply(self, event: ItemUpserted | Interaction | Order) -> Applied:
        """Apply one event; return whether it changed the graph and the items it touched."""
        self.stats.events += 1
        if isinstance(event, ItemUpserted):
            result = self._upsert(event)
        elif isinstance(event, Interaction):
            result = self._interact(event)
        elif isinstance(event, Order):
            result = self._cancel(event) if event.status == "cancelled" else self._place(event)
        else:
            raise TypeError(f"not a graph event: {type(event).__name__}")
        if result.changed:
            self.version += 1
            self.last_ts = max(self.last_ts, event.epoch)
        return result

    def apply_all(self, events: Iterable[ItemUpserted | Interaction | Order]) -> int:
        """Apply events in order; return how many changed the graph."""
        return sum(self.apply(e).changed for e in events)

    def _item(self, item_id: str) -> int:
        row = self.items.add(item_id)
        if row == len(self.catalog):
            self.catalog.append(Item(title=item_id))
            self.item_orders.append(Tally())
            self.co.append({})
            self.stats.placeholder_items += 1
        return row

    def _user(self, user_id: str) -> int:
        row = self.users.add(user_id)
        if row == len(self.ui):
            self.ui.append({})
        return row

    def _upsert(self, e: ItemUpserted) -> Applied:
        row = self._item(e.item_id)
        old = self.catalog[row]
        if old.has_text and old.updated > e.epoch:
            return Applied(False, (e.item_id,), "older than the catalog entry")
        if not old.has_text:
            self.stats.placeholder_items -= 1
        new = Item(e.title, e.description, e.category, e.price, e.in_stock, True, e.epoch)
        if old.has_text and (new.title, new.description, new.category, new.price, new.in_stock) == (
                old.title, old.description, old.category, old.price, old.in_stock):
            return Applied(False, (e.item_id,), "no change")
        self.catalog[row] = new
        return Applied(True, (e.item_id,))

    def _touch_user(self, user: int, item: int, ts: float, amount: float, sign: int = 1) -> None:
        """``amount``: already scaled by the clock's factor at ``ts``."""
        tally = self.ui[user].get(item)
        if tally is None:
            tally = self.ui[user][item] = Tally(ts=ts)
        tally.add(ts, amount, sign)
        if tally.count <= 0:
            del self.ui[user][item]

    def _interact(self, e: Interaction) -> Applied:
        amount = self.config.interaction_weights.get(e.kind)
        if amount is None:
            raise ValueError(f"no interaction weight configured for kind {e.kind!r}")
        self._touch_user(self._user(e.user_id), self._item(e.item_id), e.epoch, amount * self._factor(e.epoch))
        return Applied(True, (e.item_id,))

    def _pairs(self, rows: tuple[int, ...], ts: float, sign: int, unit: float) -> None:
        """Count an order's items and pairs in (``sign=1``) or out; ``unit``: the clock's factor at ``ts``.

        The replay's and the worker's hottest loop: a pair update is two
        additions on a tally (see :class:`DecayClock`), written out inline.
        """
        for row in rows:
            self.item_orders[row].add(ts, unit, sign)
        if self.config.max_order_items and len(rows) > self.config.max_order_items:
            self.stats.oversized_orders += 1
            return
        co = self.co
        amount = sign * unit
        for a_pos, a in enumerate(rows):
            nbrs_a = co[a]
            for b in rows[a_pos + 1 :]:
                tally = nbrs_a.get(b)
                if tally is None:
                    if sign > 0:
                        nbrs_a[b] = co[b][a] = Tally(1, unit, ts)
                    continue
                tally.count += sign
                tally.weight += amount
                if ts > tally.ts:
                    tally.ts = ts
                if tally.count <= 0:
                    del nbrs_a[b], co[b][a]

    def _place(self, e: Order) -> Applied:
        if e.order_id in self.orders:
            self.stats.duplicates += 1
            return Applied(False, (), f"order {e.order_id} already applied")
        ts = e.epoch
        rows = tuple(self._item(i) for i in e.item_ids)
        user = self._user(e.user_id) if e.user_id else -1
        self.orders[e.order_id] = OrderRecord(ts, user, rows, "placed")
        unit = self._factor(ts)
        self._pairs(rows, ts, +1, unit)
        if user >= 0:
            amount = self.config.interaction_weights["purchase"] * unit
            for row in rows:
                self._touch_user(user, row, ts, amount)
        self.stats.orders_placed += 1
        return Applied(True, tuple(e.item_ids))

    def _cancel(self, e: Order) -> Applied:
        record = self.orders.get(e.order_id)
        if record is None:
            # Remember it, so a late "placed" event for this order is ignored too.
            self.orders[e.order_id] = OrderRecord(e.epoch, -1, (), "cancelled")
            self.stats.cancellations_unmatched += 1
            return Applied(False, (), f"cancels unknown order {e.order_id}")
        if record.status == "cancelled":
            self.stats.duplicates += 1
            return Applied(False, (), f"order {e.order_id} already cancelled")
        record.status = "cancelled"
        unit = self._factor(record.ts)
        self._pairs(record.items, record.ts, -1, unit)
        if record.user >= 0:
            amount = self.config.interaction_weights["purchase"] * unit
            for row in record.items:
                self._touch_user(record.user, row, record.ts, amount, -1)
        self.stats.orders_cancelled += 1
        return Applied(True, tuple(self.items.ids[r] for r in record.items))

    # ---- reading ---------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.users)

    def num_co_edges(self) -> int:
        """Undirected co-purchase edges."""
        return sum(len(n) for n in self.co) // 2

    def num_ui_edges(self) -> int:
        return sum(len(n) for n in self.ui)

    def co_purchase(self, a: str, b: str) -> Tally | None:
        """The co-purchase tally of two items, or None."""
        ra, rb = self.items.get(a), self.items.get(b)
        if ra is None or rb is None:
            return None
        return self.co[ra].get(rb)

    def co_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Undirected co-purchase edges ``(a, b, count, weight@now)`` with ``a < b``."""
        now = self.last_ts if now is None else now
        clock = self.clock
        src, dst, cnt, w = [], [], [], []
        for a, nbrs in enumerate(self.co):
            for b, t in nbrs.items():
                if a < b:
                    src.append(a), dst.append(b), cnt.append(t.count), w.append(t.value(now, clock))
        return (np.asarray(src, np.int64), np.asarray(dst, np.int64),
                np.asarray(cnt, np.int64), np.asarray(w, np.float64))

    def ui_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User–item edges ``(user, item, count, weight@now)``."""
        now = self.last_ts if now is None else now
        clock = self.clock
        src, dst, cnt, w = [], [], [], []
        for u, nbrs in enumerate(self.ui):
            for i, t in nbrs.items():
                src.append(u), dst.append(i), cnt.append(t.count), w.append(t.value(now, clock))
        return (np.asarray(src, np.int64), np.asarray(dst, np.int64),
                np.asarray(cnt, np.int64), np.asarray(w, np.float64))

    def co_purchase_matrix(self, now: float | None = None, counts: bool = False) -> sp.csr_matrix:
        """Symmetric item×item matrix of decayed weights (or raw counts)."""
        a, b, cnt, w = self.co_edges(now)
        vals = (cnt if counts else w).astype(np.float64)
        n = self.num_items
        m = sp.coo_matrix((np.concatenate([vals, vals]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n))
        return m.tocsr()

    def user_item_matrix(self, now: float | None = None, counts: bool = False) -> sp.csr_matrix:
        """user×item matrix of decayed interaction weights (or raw counts)."""
        u, i, cnt, w = self.ui_edges(now)
        vals = (cnt if counts else w).astype(np.float64)
        return sp.csr_matrix((vals, (u, i)), shape=(self.num_users, self.num_items))

    def item_order_counts(self) -> np.ndarray:
        """How many placed (not cancelled) orders contain each item."""
        return np.fromiter((t.count for t in self.item_orders), np.int64, self.num_items)
