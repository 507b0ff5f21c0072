"""The graph store: items, users and time-decayed edges, changed only by events.

Every path that changes the graph — the batch replay of a dataset, the Faust
worker and the tests — calls :meth:`GraphStore.apply_many` (or ``apply`` for
one event), so they cannot disagree about what an event means. Events are
read one by one (ids, duplicates, cancellations); the edge changes of a batch
are then added in bulk (:mod:`graph.tallies`).

Edge weights decay exponentially with a configurable half-life: a co-purchase
``dt`` seconds ago counts ``2 ** (-dt / half_life)`` (kept against a reference
time, see :class:`DecayClock`). Each edge keeps its raw count too, because
explanations ("bought together in 37 orders") quote counts.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from graph.events import Interaction, ItemUpserted, Order, OrderFacts
from graph.tallies import EdgeTable, Tallies, Tally

__all__ = ["Applied", "DecayClock", "GraphConfig", "GraphEvent", "GraphStore", "IdMap", "Item", "OrderRecord",
           "Stats", "Tally", "tune_gc"]

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
        1000, ge=0,
        description="orders with more distinct items add no co-purchase pairs (0: no limit). An order of n items "
                    "is n(n-1)/2 pairs in one update: 10,000 items (the schema's cap) would take GBs; the largest of "
                    "Online Retail II's 53,628 invoices has 1,110",
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


def tune_gc() -> None:
    """Collect young objects every 50,000 allocations instead of 700.

    The graph holds millions of small long-lived objects (one per edge) and
    has no reference cycles to speak of; with the default thresholds the
    cyclic collector took 63 % of a replay (Online Retail II: 1.09 s → 0.47 s
    with this setting; the stream worker's scoring process gains the same).
    """
    gc.set_threshold(50_000, 20, 100)


GraphEvent = ItemUpserted | Interaction | Order | OrderFacts
"""What :meth:`GraphStore.apply_many` takes: an event, or an order as :class:`~graph.events.OrderFacts`."""

_TRIU: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _pairs(starts: np.ndarray, sizes: np.ndarray, enabled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(i, j)``, ``i < j``, of every pair of items within each enabled order of a flat row array."""
    parts_a, parts_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start, n in zip(starts[enabled].tolist(), sizes[enabled].tolist()):
        if n > 1:
            local = _TRIU.get(n)
            if local is None:
                local = np.triu_indices(n, 1)
                if n <= 512:
                    _TRIU[n] = local
            parts_a.append(local[0] + start)
            parts_b.append(local[1] + start)
    return np.concatenate(parts_a), np.concatenate(parts_b)


@dataclass(slots=True)
class _Delta:
    """Edge changes of one order, waiting for the batch's bulk update."""

    rows: tuple[int, ...]
    user: int
    sign: int
    unit: float  # the clock's factor at ``ts``
    ts: float
    pairs: bool  # False: an oversized order counts its items but adds no pairs


@dataclass
class GraphStore:
    """Items, users, co-purchase (item–item) and interaction (user–item) edges."""

    config: GraphConfig = field(default_factory=GraphConfig)
    items: IdMap = field(default_factory=IdMap)
    users: IdMap = field(default_factory=IdMap)
    catalog: list[Item] = field(default_factory=list)
    item_orders: Tallies = field(default_factory=Tallies)  # by item row: placed orders holding it
    co: EdgeTable = field(default_factory=lambda: EdgeTable(symmetric=True))
    ui: EdgeTable = field(default_factory=lambda: EdgeTable(symmetric=False))
    orders: dict[str, OrderRecord] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    last_ts: float = 0.0
    version: int = 0
    clock: DecayClock = field(init=False)
    _deltas: list[_Delta] = field(default_factory=list, init=False, repr=False)
    _interactions: list[tuple[int, int, float, float]] = field(default_factory=list, init=False, repr=False)

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
        self._flush()  # queued amounts are scaled to the old reference
        scale = self.clock.factor(ref) ** -1
        for tallies in (self.item_orders, self.co.tallies, self.ui.tallies):
            tallies.rescale(scale)
        self.clock.ref = ref

    # ---- applying events -------------------------------------------------
    def apply(self, event: GraphEvent) -> Applied:
        """Apply one event; return whether it changed the graph and the items it touched."""
        return self.apply_many([event])[0]

    def apply_many(self, events: Iterable[GraphEvent]) -> list[Applied]:
        """Apply events in order; return each one's outcome. Same result as one :meth:`apply` each, faster."""
        results = []
        try:
            for event in events:
                results.append(self._apply(event))
        finally:  # what was applied before a bad event stays applied, edges included
            self._flush()
        return results

    def apply_all(self, events: Iterable[GraphEvent], batch: int = 2000) -> int:
        """Apply events in order (in batches of ``batch``); return how many changed the graph."""
        changed, chunk = 0, []
        for event in events:
            chunk.append(event)
            if len(chunk) == batch:
                changed += sum(r.changed for r in self.apply_many(chunk))
                chunk = []
        return changed + sum(r.changed for r in self.apply_many(chunk))

    def _apply(self, event: GraphEvent) -> Applied:
        self.stats.events += 1
        if isinstance(event, Order):
            event = event.facts()
        if isinstance(event, OrderFacts):
            result = self._cancel(event) if event.status == "cancelled" else self._place(event)
        elif isinstance(event, ItemUpserted):
            result = self._upsert(event)
        elif isinstance(event, Interaction):
            result = self._interact(event)
        else:
            raise TypeError(f"not a graph event: {type(event).__name__}")
        if result.changed:
            self.version += 1
            self.last_ts = max(self.last_ts, event.epoch)
        return result

    def _flush(self) -> None:
        """Add the queued edge changes: item counts, co-purchase pairs, user–item edges."""
        deltas, self._deltas = self._deltas, []
        interactions, self._interactions = self._interactions, []
        if deltas:
            sizes = np.fromiter((len(d.rows) for d in deltas), np.int64, len(deltas))
            rows = np.fromiter((r for d in deltas for r in d.rows), np.int64, int(sizes.sum()))
            sign = np.repeat(np.fromiter((d.sign for d in deltas), np.int64, len(deltas)), sizes)
            unit = np.repeat(np.fromiter((d.unit for d in deltas), np.float64, len(deltas)), sizes)
            ts = np.repeat(np.fromiter((d.ts for d in deltas), np.float64, len(deltas)), sizes)
            self.item_orders.add(rows, sign, unit, ts)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            a, b = _pairs(starts, sizes, np.fromiter((d.pairs for d in deltas), bool, len(deltas)))
            self.co.update(rows[a], rows[b], sign[a], unit[a], ts[a])
            users = np.repeat(np.fromiter((d.user for d in deltas), np.int64, len(deltas)), sizes)
            by_user = users >= 0
            purchase = self.config.interaction_weights["purchase"]
            self.ui.update(users[by_user], rows[by_user], sign[by_user], purchase * unit[by_user], ts[by_user])
        if interactions:
            user, item, amount, ts_ = (np.array(col) for col in zip(*interactions))
            self.ui.update(user, item, np.ones(len(user), np.int64), amount, ts_)

    def _item(self, item_id: str) -> int:
        row = self.items.add(item_id)
        if row == len(self.catalog):
            self.catalog.append(Item(title=item_id))
            self.item_orders.resize(row + 1)
            self.co.grow(row + 1)
            self.stats.placeholder_items += 1
        return row

    def _user(self, user_id: str) -> int:
        row = self.users.add(user_id)
        self.ui.grow(row + 1)
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

    def _interact(self, e: Interaction) -> Applied:
        amount = self.config.interaction_weights.get(e.kind)
        if amount is None:
            raise ValueError(f"no interaction weight configured for kind {e.kind!r}")
        user, item = self._user(e.user_id), self._item(e.item_id)
        amount *= self._factor(e.epoch)  # before the append: moving the clock flushes the queue
        self._interactions.append((user, item, amount, e.epoch))
        return Applied(True, (e.item_id,))

    def _queue(self, record: OrderRecord, sign: int) -> None:
        limit = self.config.max_order_items
        pairs = not limit or len(record.items) <= limit
        if not pairs and sign > 0:
            self.stats.oversized_orders += 1
        unit = self._factor(record.ts)  # before the append: moving the clock flushes the queue
        self._deltas.append(_Delta(record.items, record.user, sign, unit, record.ts, pairs))

    def _place(self, e: OrderFacts) -> Applied:
        if e.order_id in self.orders:
            self.stats.duplicates += 1
            return Applied(False, (), f"order {e.order_id} already applied")
        ids = e.item_ids
        rows = tuple(map(self.items.index.get, ids))
        if None in rows:
            rows = tuple(self._item(i) for i in ids)
        user = self._user(e.user_id) if e.user_id else -1
        record = self.orders[e.order_id] = OrderRecord(e.epoch, user, rows, "placed")
        self._queue(record, +1)
        self.stats.orders_placed += 1
        return Applied(True, ids)

    def _cancel(self, e: OrderFacts) -> Applied:
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
        self._queue(record, -1)
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
        return len(self.co)

    def num_ui_edges(self) -> int:
        return len(self.ui)

    def co_purchase(self, a: str, b: str) -> Tally | None:
        """The co-purchase tally of two items, or None."""
        ra, rb = self.items.get(a), self.items.get(b)
        if ra is None or rb is None:
            return None
        return self.co.get(ra, rb)

    def interaction(self, user_id: str, item_id: str) -> Tally | None:
        """The user–item tally (purchases and interactions), or None."""
        user, item = self.users.get(user_id), self.items.get(item_id)
        if user is None or item is None:
            return None
        return self.ui.get(user, item)

    def weights(self, tallies: Tallies, ids: np.ndarray, now: float | None = None) -> np.ndarray:
        """Decayed weights of ``tallies[ids]`` as seen at ``now`` (default: the newest event), as :meth:`Tally.value`."""
        now = self.last_ts if now is None else now
        seen = np.maximum(tallies.ts[ids], now)
        ref = self.clock.ref if self.clock.ref is not None else now
        return np.maximum(tallies.weight[ids], 0.0) * np.exp2((ref - seen) / self.half_life)

    def _edges(self, table: EdgeTable, now: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        a, b, slots = table.edges()
        return a, b, table.tallies.count[slots], self.weights(table.tallies, slots, now)

    def co_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Undirected co-purchase edges ``(a, b, count, weight@now)`` with ``a < b``, ordered by ``(a, b)``."""
        return self._edges(self.co, now)

    def ui_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User–item edges ``(user, item, count, weight@now)``, ordered by ``(user, item)``."""
        return self._edges(self.ui, now)

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
        return self.item_orders.count[: self.num_items].copy()
