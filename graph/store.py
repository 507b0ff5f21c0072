"""The graph store: items, users and time-decayed edges, changed only by events.

Every path that changes the graph — the import of a dataset, the Faust
worker and the tests — calls :meth:`GraphStore.apply_many` (or ``apply`` for
one event), so they cannot disagree about what an event means. Events are
read one by one (ids, duplicates, cancellations); the edge changes of a batch
are then added in bulk.

Edge weights decay exponentially with a configurable half-life: a co-purchase
``dt`` seconds ago counts ``2 ** (-dt / half_life)`` (kept against a reference
time, see :class:`DecayClock`). Each edge keeps its raw count too, because
explanations ("bought together in 37 orders") quote counts.

Memory: a co-purchase pair takes 24 bytes (:mod:`graph.tallies`), an
order inside the cancellation window its item rows and a few numbers
(:mod:`graph.orders`), an item or user its id and catalog entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from graph.events import Interaction, InteractionFacts, ItemUpserted, Order, OrderFacts, OrderShare
from graph.orders import CANCELLED, PLACED, OrderLog
from graph.tallies import THREADS, EdgeTable, Rows, Tallies, Tally, on_threads

__all__ = ["Applied", "DecayClock", "GraphConfig", "GraphEvent", "GraphStore", "IdMap", "Item", "Stats", "Tally",
           "tune_gc"]

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
    order_window_days: float | None = Field(
        90.0, gt=0,
        description="how long the store remembers an order after the newest one: a cancellation takes it back "
                    "exactly and a repeat is ignored inside this window; an order or cancellation older than it "
                    "is refused (dead letters). null keeps every order (memory grows with history)",
    )
    max_future_days: float = Field(
        1.0, ge=0, description="events dated more than this after the wall clock are refused (dead letters): one "
                               "far-future date would decay every other weight to nothing",
    )


class DecayClock:
    """Exponential decay against a fixed reference time.

    A weight is kept as it would be at ``ref``: an observation of ``amount``
    at ``ts`` adds ``amount * 2 ** ((ts - ref) / half_life)``, and the weight
    seen at ``now`` is the sum times ``2 ** ((ref - now) / half_life)``. So an
    update is one multiply-add with a factor computed once per event, in any
    arrival order (late events included), instead of re-decaying every edge
    it touches. ``ref`` moves forward (every weight rescaled) before factors
    could overflow the stored ``float32`` weights.
    """

    __slots__ = ("half_life", "ref")

    MAX_HALF_LIVES = 64.0  # 2**64 times any count stays far below float32's 2**128

    def __init__(self, half_life: float, ref: float | None = None) -> None:
        self.half_life = half_life
        self.ref = ref

    def factor(self, ts: float) -> float:
        """What one unit observed at ``ts`` adds to a reference-time weight (0 for times ~1,000 half-lives back)."""
        return 2.0 ** max((ts - self.ref) / self.half_life, -1070.0)

    def scale(self, now: float) -> float:
        """Reference-time weights times this are weights seen at ``now``."""
        return 2.0 ** max(min((self.ref - now) / self.half_life, 1000.0), -1070.0)


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


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of one event: did the graph change, which items did it touch, and was it refused.

    ``rejected``: the event cannot be applied as it stands (``note`` says why); the stream worker and the
    importers send it to dead letters. ``items``: in a partitioned store, those of the event's partition.
    ``change``: what an order event changed, as the order's facts (a
    cancellation: the placed order's items, user and time, status "cancelled"), which the worker splits by
    item for the stores that own them (:meth:`~graph.events.OrderFacts.shares`).
    """

    changed: bool
    items: tuple[str, ...] = ()
    note: str = ""
    rejected: bool = False
    ahead: bool = False  # a cancellation recorded before its order, which may still come (then it is ignored)
    change: OrderFacts | None = None


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
    """Counters of what the store has seen, for logs, metrics and tests. A store that adopts partitions
    (:meth:`GraphStore.adopt`) keeps the larger of each counter: after a restart they can count events again."""

    events: int = 0
    orders_placed: int = 0
    orders_cancelled: int = 0
    cancellations_unmatched: int = 0
    duplicates: int = 0
    placeholder_items: int = 0
    oversized_orders: int = 0
    outside_window: int = 0
    future: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _pair_changes(x: sp.csr_matrix, rows_of: np.ndarray | None = None) -> Rows:
    """Off-diagonal entries of ``onesᵀ x`` (``x``: orders × items, complex changes) as sorted rows;
    ``rows_of``: which entries of ``x`` give their item a row of pairs (default all; see ``GraphStore.partition_of``).

    The product is computed in ranges of rows on :data:`~graph.tallies.THREADS` threads: scipy's product
    and sort release the GIL (on 2 cores, twice as fast as one product).
    """
    n_items = x.shape[1]
    if rows_of is None:
        ones_t = sp.csr_matrix((np.ones(x.nnz, np.float32), x.indices, x.indptr), shape=x.shape).T.tocsr()
    else:
        lines = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[rows_of]
        ones_t = sp.csr_matrix((np.ones(len(lines), np.float32), (x.indices[rows_of], lines)), shape=x.shape[::-1])
    cuts = np.linspace(0, n_items, THREADS + 1).astype(np.int64)

    def rows(k: int) -> sp.csr_matrix:
        block = ones_t[int(cuts[k]) : int(cuts[k + 1])] @ x  # those rows of the product, columns unsorted
        block.sort_indices()
        return block

    parts = on_threads(rows, range(THREADS), "pairs")
    product = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    del parts
    row_of = np.repeat(np.arange(n_items, dtype=np.int32), np.diff(product.indptr))
    product.data[product.indices == row_of] = 0  # an item with itself: its own count, not a pair
    del row_of
    product.eliminate_zeros()  # in place: the product has no other zeros (it drops them)
    data = product.data
    return Rows(product.indptr.astype(np.int64), product.indices, np.rint(data.real).astype(np.int32), data.imag)


def tune_gc() -> None:
    """Collect young objects every 50,000 allocations instead of 700.

    Replays and the worker allocate many short-lived objects per event
    (events, tuples) while holding large long-lived state; with the default
    thresholds the cyclic collector took 63 % of a replay (Online Retail II:
    1.09 s → 0.47 s with this setting).
    """
    import gc

    gc.set_threshold(50_000, 20, 100)


GraphEvent = ItemUpserted | Interaction | InteractionFacts | Order | OrderFacts | OrderShare
"""What :meth:`GraphStore.apply_many` takes: an event, an order or interaction as its facts
(:class:`~graph.events.OrderFacts`, :class:`~graph.events.InteractionFacts`), or an order's change for one
partition's items (:class:`~graph.events.OrderShare`)."""

ROUTED = -1
"""The stream of events that come from the repartition: applied to their partition's items whatever the store's."""


def _days(seconds: float) -> str:
    return f"{seconds / DAY:,.1f} days"


@dataclass
class GraphStore:
    """Items, users, co-purchase (item–item) and interaction (user–item) edges.

    Partitioned by item (the stream worker's tasks, see :class:`~graph.events.OrderShare`): with
    ``partition_of`` (item id → partition), an order or interaction applied from stream ``p`` (the worker's
    source partition) changes the rows of the items of partition ``p`` only — their co-purchase rows, order
    counts and user–item edges — and an :class:`~graph.events.OrderShare` (stream :data:`ROUTED`) those of its
    partition. The stores of all partitions together then hold what one store without ``partition_of`` holds.
    Catalog, ids and the order logs (by stream) are kept whatever the partition.
    """

    config: GraphConfig = field(default_factory=GraphConfig)
    partition_of: Callable[[str], int] | None = None
    items: IdMap = field(default_factory=IdMap)
    users: IdMap = field(default_factory=IdMap)
    catalog: list[Item] = field(default_factory=list)
    item_orders: Tallies = field(default_factory=Tallies)  # by item row: placed orders holding it
    co: EdgeTable = field(default_factory=lambda: EdgeTable(symmetric=True))
    ui: EdgeTable = field(default_factory=lambda: EdgeTable(symmetric=False))
    orders: OrderLog = field(init=False)
    stats: Stats = field(default_factory=Stats)
    last_ts: float = 0.0
    version: int = 0
    clock: DecayClock = field(init=False)
    _part: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32), init=False, repr=False)  # by item row
    # edge changes waiting for the batch's bulk update: (item rows, user row, sign, clock factor, adds pairs,
    # the partition whose items' rows change or -1 for every item)
    _orders: list[tuple[tuple[int, ...] | np.ndarray, int, int, float, bool, int]] = field(
        default_factory=list, init=False, repr=False)
    _interactions: list[tuple[int, int, float, int]] = field(default_factory=list, init=False, repr=False)
    _found: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # order id → slot, this batch
    _new: dict[str, None] = field(default_factory=dict, init=False, repr=False)  # order ids recorded in this batch
    _found_i: dict[str, int] = field(default_factory=dict, init=False, repr=False)  # the same for interaction ids
    _new_i: dict[str, None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.clock = DecayClock(self.config.half_life_days * DAY)
        window = self.config.order_window_days
        self.orders = OrderLog(None if window is None else window * DAY)
        # interactions sent with an event_id, remembered for the same window (no item rows): a repeat is ignored
        self.interaction_ids = OrderLog(None if window is None else window * DAY)
        self.partition(self.partition_of)

    def partition(self, partition_of: Callable[[str], int] | None) -> None:
        """Partition the items by ``partition_of`` from now on (None: not partitioned); for a store just read
        from a snapshot."""
        self._flush()
        self.partition_of = partition_of
        self._part = np.array([partition_of(i) for i in self.items.ids] if partition_of else [0] * len(self.items),
                              np.int32)

    def part_of(self, rows: np.ndarray) -> np.ndarray:
        """The partition of each item row (all 0 when the store is not partitioned)."""
        return self._part[rows]

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
        """Move the reference time to ``ref``, rescaling every weight (rare: once per 64 half-lives)."""
        self._flush()  # queued amounts are scaled to the old reference
        scale = float(np.exp2((self.clock.ref - ref) / self.clock.half_life))
        self.item_orders.rescale(scale)
        self.co.rescale(scale)
        self.ui.rescale(scale)
        self.clock.ref = ref

    # ---- applying events -------------------------------------------------
    def apply(self, event: GraphEvent) -> Applied:
        """Apply one event; return whether it changed the graph and the items it touched."""
        return self.apply_many([event])[0]

    def apply_many(self, events: Iterable[GraphEvent], streams: Sequence[int] | None = None) -> list[Applied]:
        """Apply events in order; return each one's outcome. Same result as one :meth:`apply` each, faster.

        ``streams``: each event's stream, for orders the stream whose time the order window follows (the
        worker passes the source partition, see :mod:`graph.orders`); default one stream.
        """
        events = [e.facts() if isinstance(e, Order) else e for e in events]
        streams = [0] * len(events) if streams is None else list(streams)
        ids = [e.order_id for e in events if isinstance(e, OrderFacts)]
        keys, slots = self.orders.lookup(ids)
        self._found = dict(zip(ids, slots))
        key_of = dict(zip(ids, keys.tolist()))
        iids = [e.event_id for e in events if isinstance(e, (Interaction, InteractionFacts)) and e.event_id]
        ikeys, islots = self.interaction_ids.lookup(iids)
        self._found_i = dict(zip(iids, islots))
        ikey_of = dict(zip(iids, ikeys.tolist()))
        results = []
        try:
            for event, stream in zip(events, streams):
                results.append(self._apply(event, stream))
        finally:  # what was applied before a bad event stays applied, edges included
            new, self._new = list(self._new), {}
            self.orders.index(new, [key_of[i] for i in new], [self._found[i] for i in new])
            self._found = {}
            new, self._new_i = list(self._new_i), {}
            self.interaction_ids.index(new, [ikey_of[i] for i in new], [self._found_i[i] for i in new])
            self._found_i = {}
            self._flush()
            self.orders.reclaim()
            self.interaction_ids.reclaim()
        return results

    def apply_all(self, events: Iterable[GraphEvent], batch: int = 5000) -> int:
        """Apply events in order (in batches of ``batch``); return how many changed the graph."""
        changed, chunk = 0, []
        for event in events:
            chunk.append(event)
            if len(chunk) == batch:
                changed += sum(r.changed for r in self.apply_many(chunk))
                chunk = []
        return changed + sum(r.changed for r in self.apply_many(chunk))

    def _apply(self, event: GraphEvent, stream: int = 0) -> Applied:
        self.stats.events += 1
        if event.epoch > time.time() + self.config.max_future_days * DAY:
            self.stats.future += 1
            return Applied(False, (), f"dated {_days(event.epoch - time.time())} in the future (accepted: up to "
                                      f"graph.max_future_days={self.config.max_future_days:g} ahead of the clock)",
                           rejected=True)
        if isinstance(event, OrderFacts):
            result = self._cancel(event, stream) if event.status == "cancelled" else self._place(event, stream)
        elif isinstance(event, OrderShare):
            result = self._share(event)
        elif isinstance(event, ItemUpserted):
            result = self._upsert(event)
        elif isinstance(event, (Interaction, InteractionFacts)):
            result = self._interact(event, stream)
        else:
            raise TypeError(f"not a graph event: {type(event).__name__}")
        if result.changed:
            self.version += 1
            self.last_ts = max(self.last_ts, event.epoch)
        return result

    def _flush(self) -> None:
        """Add the queued edge changes: item counts, co-purchase pairs, user–item edges.

        Pairs come from one sparse product: with ``X`` the batch's orders ×
        items (0/1) and ``s`` each order's signed change (+1 placed, -1
        taken back) as the complex number ``s + i·s·factor``, the entries of
        ``Xᵀ diag(s) X`` off the diagonal are every pair's count change (real
        part) and weight change (imaginary part), summed over the batch by
        scipy's compiled product instead of one array entry per pair. In a
        partitioned store only the lines of the change's partition give rows
        (``_pair_changes``'s ``rows_of``), counts and user–item edges.
        """
        orders, self._orders = self._orders, []
        interactions, self._interactions = self._interactions, []
        n_items, n_users = self.num_items, self.num_users
        ui: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if orders:
            sizes = np.fromiter((len(o[0]) for o in orders), np.int64, len(orders))
            rows = np.fromiter(chain.from_iterable(o[0] for o in orders), np.int64, int(sizes.sum()))
            sign = np.fromiter((o[2] for o in orders), np.float64, len(orders))
            unit = np.fromiter((o[3] for o in orders), np.float64, len(orders))
            kept = None  # the lines whose item gets the change: all of them unless the store is partitioned
            if self.partition_of is not None:
                kept = self._part[rows] == np.repeat(np.fromiter((o[5] for o in orders), np.int32, len(orders)), sizes)
            mine = slice(None) if kept is None else kept
            self.item_orders.add(rows[mine], np.repeat(sign, sizes).astype(np.int64)[mine],
                                 np.repeat(sign * unit, sizes)[mine])
            # complex64: exact counts up to 2**24 per pair and batch, float32 weights as the tables keep them
            per_line = np.repeat((sign + 1j * sign * unit).astype(np.complex64), sizes)
            pairs = np.fromiter((o[4] for o in orders), bool, len(orders)) & (sizes > 1)
            if pairs.any():
                take = np.repeat(pairs, sizes)
                x = sp.csr_matrix((per_line[take], rows[take], np.concatenate([[0], np.cumsum(sizes[pairs])])),
                                  shape=(int(pairs.sum()), n_items))
                self.co.add(_pair_changes(x, None if kept is None else kept[take]))
            users = np.fromiter((o[1] for o in orders), np.int64, len(orders))
            by_user = np.repeat(users >= 0, sizes)
            if kept is not None:
                by_user &= kept
            purchase = self.config.interaction_weights["purchase"]
            ui.append((np.repeat(users, sizes)[by_user], rows[by_user],
                       per_line[by_user].real + 1j * purchase * per_line[by_user].imag.astype(np.float64)))
        if interactions and self.partition_of is not None:
            interactions = [x for x in interactions if x[3] == ROUTED or self._part[x[1]] == x[3]]
        if interactions:
            user, item, amount, _ = (np.array(col) for col in zip(*interactions))
            ui.append((user.astype(np.int64), item.astype(np.int64), 1 + 1j * amount))
        if ui:
            user, item, change = (np.concatenate(col) for col in zip(*ui))
            self.ui.add(Rows.from_matrix(sp.coo_matrix((change, (user, item)), shape=(n_users, n_items)).tocsr()))

    def _item(self, item_id: str) -> int:
        row = self.items.add(item_id)
        if row == len(self.catalog):
            self.catalog.append(Item(title=item_id))
            if len(self._part) <= row:
                self._part = np.concatenate([self._part, np.zeros(max(1024, len(self._part)), np.int32)])
            self._part[row] = self.partition_of(item_id) if self.partition_of else 0
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

    def _interact(self, e: Interaction | InteractionFacts, stream: int = 0) -> Applied:
        amount = self.config.interaction_weights.get(e.kind)
        if amount is None:
            raise ValueError(f"no interaction weight configured for kind {e.kind!r}")
        if e.event_id:  # idempotent on its id inside the window, as orders are on theirs
            log, slot = self.interaction_ids, self._found_i.get(e.event_id, -1)
            if log.visible(slot):
                self.stats.duplicates += 1
                return Applied(False, (), f"interaction {e.event_id} already applied")
            if (refused := self._outside(log, f"interaction {e.event_id}", e.epoch, stream, "tell a repeat")):
                return refused
            log.seen(e.epoch, stream)
            self._new_i[e.event_id] = None
            self._found_i[e.event_id] = log.append(e.event_id, e.epoch, -1, (), PLACED, stream)
        user, item = self._user(e.user_id), self._item(e.item_id)
        amount *= self._factor(e.epoch)  # before the append: moving the clock flushes the queue
        self._interactions.append((user, item, amount, stream))
        return Applied(True, (e.item_id,) if stream == ROUTED else self._changed((e.item_id,), (item,), stream))

    def _queue(self, rows: tuple[int, ...] | np.ndarray, user: int, sign: int, ts: float, stream: int) -> None:
        """Queue an order's change to the items of partition ``stream`` (see the class) for the bulk update."""
        limit = self.config.max_order_items
        pairs = not limit or len(rows) <= limit
        unit = self._factor(ts)  # before the append: moving the clock flushes the queue
        self._orders.append((rows, user, sign, unit, pairs, stream))

    def _outside(self, log: OrderLog, what: str, epoch: float, stream: int,
                 can: str = "tell a repeat or take it back") -> Applied | None:
        """The refusal of an event (``what``: "order <id>") dated before its stream's window in ``log``, if it is;
        ``can``: what the store can do inside the window."""
        if epoch >= log.horizon(stream):
            return None
        self.stats.outside_window += 1
        noun = what.split()[0]
        return Applied(False, (), f"{what} is dated {_days(log.newest[stream] - epoch)} before the newest {noun}, "
                                  f"outside the {_days(log.window or 0)} window in which the store can {can} "
                                  "(graph.order_window_days)", rejected=True)

    def _place(self, e: OrderFacts, stream: int) -> Applied:
        log, slot = self.orders, self._found.get(e.order_id, -1)
        if log.visible(slot):
            self.stats.duplicates += 1
            done = "cancelled" if log.status[slot] == CANCELLED else "applied"
            return Applied(False, (), f"order {e.order_id} already {done}")
        if (refused := self._outside(self.orders, f"order {e.order_id}", e.epoch, stream)) is not None:
            return refused
        log.seen(e.epoch, stream)
        ids = e.item_ids
        rows = tuple(map(self.items.index.get, ids))
        if None in rows:
            rows = tuple(self._item(i) for i in ids)
        user = self._user(e.user_id) if e.user_id else -1
        self._record(e.order_id, log.append(e.order_id, e.epoch, user, rows, PLACED, stream))
        self._queue(rows, user, +1, e.epoch, stream)
        if self.config.max_order_items and len(rows) > self.config.max_order_items:
            self.stats.oversized_orders += 1
        self.stats.orders_placed += 1
        return Applied(True, self._changed(ids, rows, stream), change=e)

    def _record(self, order_id: str, slot: int) -> None:
        """A record appended in this batch: found from now on, indexed when the batch ends."""
        self._new[order_id] = None
        self._found[order_id] = slot

    def _cancel(self, e: OrderFacts, stream: int) -> Applied:
        log, slot = self.orders, self._found.get(e.order_id, -1)
        if not log.visible(slot):
            if (refused := self._outside(self.orders, f"order {e.order_id}", e.epoch, stream)) is not None:
                return refused
            log.seen(e.epoch, stream)
            # Remember it, so a late "placed" event for this order is ignored too.
            self._record(e.order_id, log.append(e.order_id, e.epoch, -1, (), CANCELLED, stream))
            self.stats.cancellations_unmatched += 1
            return Applied(False, (), f"cancels unknown order {e.order_id} (never seen, or placed more than "
                                      f"{_days(log.window or 0)} before the newest order): recorded, a late "
                                      "placement of it will be ignored", rejected=True, ahead=True)
        log.seen(e.epoch, stream)
        if log.status[slot] == CANCELLED:
            self.stats.duplicates += 1
            return Applied(False, (), f"order {e.order_id} already cancelled")
        log.status[slot] = CANCELLED
        rows = log.items_of(slot).copy()
        user, placed = int(log.user[slot]), float(log.ts[slot])
        self._queue(rows, user, -1, placed, stream)
        self.stats.orders_cancelled += 1
        items = tuple(self.items.ids[r] for r in rows.tolist())
        return Applied(True, self._changed(items, rows, stream),
                       change=OrderFacts(e.order_id, self.users.ids[user] if user >= 0 else None, placed, items,
                                         "cancelled"))

    def _share(self, e: OrderShare) -> Applied:
        """An order's change for one partition's items, decided by the store that saw the order: applied as is."""
        rows = tuple(self._item(i) for i in e.item_ids)
        self._queue(rows, self._user(e.user_id) if e.user_id else -1, e.sign, e.epoch, e.partition)
        return Applied(True, self._changed(e.item_ids, rows, e.partition))

    def _changed(self, ids: Sequence[str], rows: Sequence[int] | np.ndarray, partition: int) -> tuple[str, ...]:
        """Of an order's items, those whose state a change for ``partition`` touches here (all of them when the
        store is not partitioned)."""
        if self.partition_of is None:
            return tuple(ids)
        return tuple(i for i, r in zip(ids, rows) if self._part[r] == partition)

    # ---- partitions --------------------------------------------------------
    def part(self, partition: int) -> GraphStore:
        """This store's state of ``partition``: its items' co-purchase rows, order counts and user–item edges,
        and the order and interaction logs of its stream, with every id and catalog entry. What a stream
        worker checkpoints of one partition, and another worker :meth:`adopt` s when the partition moves."""
        self._flush()
        n = self.num_items
        mine = self._part[:n] == partition
        out = GraphStore(self.config, partition_of=self.partition_of)
        out.items, out.users, out.catalog = IdMap(self.items.ids), IdMap(self.users.ids), list(self.catalog)
        out._part, out.stats = self._part[:n].copy(), Stats(**self.stats.as_dict())
        out.clock.ref, out.last_ts, out.version = self.clock.ref, self.last_ts, self.version
        out.item_orders.resize(n)
        out.item_orders.count[:n] = np.where(mine, self.item_orders.count[:n], 0)
        out.item_orders.weight[:n] = np.where(mine, self.item_orders.weight[:n], 0.0)
        out.co.grow(n)
        out.co.load(self.co.select(rows=mine))
        out.ui.grow(self.num_users)
        out.ui.load(self.ui.select(columns=mine))
        out.orders, out.interaction_ids = self.orders.of_stream(partition), self.interaction_ids.of_stream(partition)
        return out

    def release(self, partition: int) -> None:
        """Forget the state of ``partition`` (see :meth:`part`): it went to another worker. Ids and catalog stay."""
        self._flush()
        n = self.num_items
        mine = self._part[:n] == partition
        self.item_orders.count[:n][mine], self.item_orders.weight[:n][mine] = 0, 0.0
        self.co.load(self.co.select(rows=~mine))
        self.ui.load(self.ui.select(columns=~mine))
        self.orders.drop_stream(partition)
        self.interaction_ids.drop_stream(partition)
        self.version += 1

    def adopt(self, other: GraphStore) -> None:
        """Take in ``other``'s state (a partition's, from :meth:`part`, perhaps of another worker's store): its
        rows, counts, user–item edges and logs are added to ours, its catalog entries newer than ours replace them."""
        self._flush()
        other._flush()
        items = np.array([self._item(i) for i in other.items.ids], np.int64)
        users = np.array([self._user(u) for u in other.users.ids], np.int64)
        for theirs, row in zip(other.catalog, items.tolist()):
            ours = self.catalog[row]
            if theirs.has_text and (not ours.has_text or theirs.updated > ours.updated):
                self.stats.placeholder_items -= not ours.has_text
                self.catalog[row] = theirs
        scale = 1.0
        if other.clock.ref is not None:
            if self.clock.ref is None:
                self.clock.ref = other.clock.ref
            scale = float(np.exp2((other.clock.ref - self.clock.ref) / self.half_life))
        n_items, n_users = self.num_items, self.num_users
        for table, theirs, rows, shape in ((self.co, other.co, items, (n_items, n_items)),
                                           (self.ui, other.ui, users, (n_users, n_items))):
            got = theirs.select()
            line = np.repeat(np.arange(got.rows), np.diff(got.indptr))
            change = got.count.astype(np.float64) + 1j * (got.weight.astype(np.float64) * scale)
            table.add(Rows.from_matrix(sp.csr_matrix((change, (rows[line], items[got.index])), shape=shape)))
        m = other.num_items
        has = other.item_orders.count[:m] != 0
        self.item_orders.add(items[has], other.item_orders.count[:m][has], other.item_orders.weight[:m][has] * scale)
        self.orders.merge(other.orders, items, users)
        self.interaction_ids.merge(other.interaction_ids, items, users)
        self.last_ts = max(self.last_ts, other.last_ts)
        self.version = max(self.version, other.version) + 1
        for name, value in other.stats.as_dict().items():  # each part carries its store's counters: not a sum
            setattr(self.stats, name, max(getattr(self.stats, name), value))

    # ---- reading ---------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.users)

    def text_rows(self) -> np.ndarray:
        """The catalog rows of items with catalog text, ascending: the rows a text encoder embeds (an item seen
        only in orders has none)."""
        return np.array([r for r, it in enumerate(self.catalog) if it.has_text], np.int64)

    def num_co_edges(self) -> int:
        """Undirected co-purchase edges."""
        return len(self.co)

    def num_ui_edges(self) -> int:
        return len(self.ui)

    def _tally(self, found: tuple[int, float] | None) -> Tally | None:
        return None if found is None else Tally(found[0], found[1], self.last_ts)

    def co_purchase(self, a: str, b: str) -> Tally | None:
        """The co-purchase tally of two items, or None."""
        ra, rb = self.items.get(a), self.items.get(b)
        if ra is None or rb is None:
            return None
        return self._tally(self.co.get(ra, rb))

    def interaction(self, user_id: str, item_id: str) -> Tally | None:
        """The user–item tally (purchases and interactions), or None."""
        user, item = self.users.get(user_id), self.items.get(item_id)
        if user is None or item is None:
            return None
        return self._tally(self.ui.get(user, item))

    def decayed(self, weight: np.ndarray, now: float | None = None) -> np.ndarray:
        """Reference-time weights as seen at ``now`` (default, and at the earliest: the newest event)."""
        now = self.last_ts if now is None or now < self.last_ts else now
        ref = self.clock.ref if self.clock.ref is not None else now
        return np.maximum(np.asarray(weight, np.float64), 0.0) * np.exp2((ref - now) / self.half_life)

    def co_neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Co-purchase neighbours of item ``row``: their rows, counts and weights seen at the newest event."""
        index, count, weight = self.co.neighbours(row)
        return index.astype(np.int64), count.astype(np.int64), self.decayed(weight)

    def co_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Undirected co-purchase edges ``(a, b, count, weight@now)`` with ``a < b``, ordered by ``(a, b)``."""
        a, b, count, weight = self.co.edges()
        return a, b, count, self.decayed(weight, now)

    def ui_edges(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """User–item edges ``(user, item, count, weight@now)``, ordered by ``(user, item)``."""
        u, i, count, weight = self.ui.edges()
        return u, i, count, self.decayed(weight, now)

    def co_purchase_matrix(self, now: float | None = None, counts: bool = False,
                           diagonal: np.ndarray | None = None) -> sp.csr_matrix:
        """Symmetric item×item matrix of decayed weights (or raw counts), float32 with int32 indices (8 bytes
        per stored entry, two per pair; a count is exact in float32 up to 2²⁴); ``diagonal``: a value per item
        to put on the diagonal (XᵀX: each item's order count)."""
        if diagonal is not None and len(diagonal) != self.num_items:
            raise ValueError(f"diagonal has {len(diagonal)} values for {self.num_items} items")
        if counts:
            return self.co.csr(self.num_items, "count", diagonal=diagonal)
        scale = float(self.decayed(np.ones(1), now)[0])  # decay is one factor for every weight
        return self.co.csr(self.num_items, "weight", scale, diagonal)

    def user_item_matrix(self, now: float | None = None, counts: bool = False) -> sp.csr_matrix:
        """user×item matrix of decayed interaction weights (or raw counts)."""
        u, i, cnt, w = self.ui_edges(now)
        vals = (cnt if counts else w).astype(np.float64)
        return sp.csr_matrix((vals, (u, i)), shape=(self.num_users, self.num_items))

    def item_order_counts(self) -> np.ndarray:
        """How many placed (not cancelled) orders contain each item."""
        return self.item_orders.count[: self.num_items].copy()

    def placed_orders(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The placed (not cancelled) orders the store remembers (every one, with ``order_window_days: null``),
        in the order they were applied: ``(ts, user row or -1, indptr, item rows)``."""
        return self.orders.placed()

    @property
    def nbytes(self) -> int:
        """Bytes of the store's arrays (edges, order log, item tallies): not its id maps and catalog strings."""
        return (self.co.nbytes + self.ui.nbytes + self.orders.nbytes + self.interaction_ids.nbytes
                + self.item_orders.count.nbytes
                + self.item_orders.weight.nbytes)
