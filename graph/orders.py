"""The order log: what each recent order added to the graph, in flat arrays.

A cancellation must take back exactly what its order added, and an order
sent twice must count once, so the store remembers each order it applied:
its time, user and item rows. It remembers them for a window
(``graph.order_window_days``, 90 days by default) before the newest order,
not forever: memory stays proportional to the orders of one window.

* Inside the window both rules are exact: the log holds every order id it
  saw there, placed or cancelled.
* An order (or a cancellation) older than the window is refused with a
  reason (it cannot be checked against the orders the log has dropped),
  so nothing is ever counted twice; a cancellation of an order the log no
  longer holds is refused the same way.

"The newest order" is kept per *stream*, as Kafka Streams keeps stream time
per partition: the stream worker passes each order's source partition (an
order and its cancellation share one: orders are keyed by order id), a file
import is one stream. A partition that the worker happens to read ahead of
the others then cannot push them out of the window; a worker and a file
import of the same time-ordered events agree exactly.

Order ids are found through a 63-bit hash (:class:`~graph.tallies.KeyIndex`)
and compared in full on a hit, so two ids never mix up. A record older
than the window is invisible at once; its memory is reclaimed in bulk when
expired records are half the log.
"""

from __future__ import annotations

import hashlib

import numpy as np

from graph.tallies import KeyIndex

PLACED, CANCELLED = 1, 2


def order_key(order_id: str) -> int:
    """A stable 63-bit hash of an order id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(order_id.encode(), digest_size=8).digest(), "little") >> 1


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    if size <= len(array):
        return array
    out = np.zeros(max(size, 2 * len(array), 1024), array.dtype)
    out[: len(array)] = array
    return out


_COLUMNS = ("ts", "user", "status", "stream", "start", "length", "id_start", "id_length")


class OrderLog:
    """Records of the orders seen inside the window: id, time, user row, status, stream and item rows.

    ``window``: seconds kept before the newest order of a record's stream
    (None: every order, as training wants).
    """

    __slots__ = ("window", "newest", *_COLUMNS, "items", "ids", "size", "used_items", "slot_of", "collisions",
                 "_reclaim_at")

    def __init__(self, window: float | None) -> None:
        self.window = window
        self.newest: dict[int, float] = {}  # stream → the time of its newest order
        self.slot_of = KeyIndex()  # order_key(id) → slot
        self.ts = np.zeros(0, np.float64)
        self.user = np.zeros(0, np.int64)
        self.status = np.zeros(0, np.int8)
        self.stream = np.zeros(0, np.int32)
        self.start = np.zeros(0, np.int64)  # its item rows: items[start : start + length]
        self.length = np.zeros(0, np.int32)
        self.id_start = np.zeros(0, np.int64)  # its id: ids[id_start : id_start + id_length]
        self.id_length = np.zeros(0, np.int32)
        self.items = np.zeros(0, np.int32)
        self.ids = bytearray()
        self.size = 0  # slots in use
        self.used_items = 0
        self.collisions: dict[str, int] = {}  # ids whose hash another id holds (astronomically rare)
        self._reclaim_at = 1024

    def __len__(self) -> int:
        """Records inside the window."""
        return int(self._inside().sum())

    def horizon(self, stream: int = 0) -> float:
        """Records of ``stream`` older than this are outside the window."""
        if self.window is None:
            return -np.inf
        return self.newest.get(stream, -np.inf) - self.window

    def _inside(self) -> np.ndarray:
        """Which slots are inside their stream's window."""
        if self.window is None or not self.size:
            return np.ones(self.size, bool)
        streams = np.array(sorted(self.newest), np.int64)
        horizons = np.array([self.horizon(s) for s in streams.tolist()])
        at = np.searchsorted(streams, self.stream[: self.size])
        return self.ts[: self.size] >= horizons[np.minimum(at, len(streams) - 1)]

    @property
    def nbytes(self) -> int:
        return (sum(getattr(self, c).nbytes for c in _COLUMNS) + self.items.nbytes + self.slot_of.keys.nbytes
                + self.slot_of.values.nbytes + len(self.ids))

    def _id(self, slot: int) -> str:
        start = int(self.id_start[slot])
        return self.ids[start : start + int(self.id_length[slot])].decode()

    def lookup(self, order_ids: list[str]) -> tuple[np.ndarray, list[int]]:
        """Hashes and slots (-1: never seen, or its record reclaimed) of many ids in one lookup. A slot found
        may be outside the window: see :meth:`visible`."""
        keys = np.array([order_key(o) for o in order_ids], np.int64)
        slots = self.slot_of.get(keys).tolist() if len(keys) else []
        for k, (order_id, slot) in enumerate(zip(order_ids, slots)):
            if slot >= 0 and self._id(slot) != order_id:
                slots[k] = self.collisions.get(order_id, -1)
        return keys, slots

    def visible(self, slot: int) -> bool:
        """Whether a slot is a record inside its stream's window."""
        return slot >= 0 and self.ts[slot] >= self.horizon(int(self.stream[slot]))

    def seen(self, ts: float, stream: int = 0) -> None:
        """An order at ``ts`` arrived on ``stream``: move its window."""
        if ts > self.newest.get(stream, -np.inf):
            self.newest[stream] = ts

    def append(self, order_id: str, ts: float, user: int, rows: np.ndarray | tuple[int, ...], status: int,
               stream: int = 0) -> int:
        """Record an order; return its slot. :meth:`index` makes it findable."""
        slot, n = self.size, len(rows)
        self.size += 1
        if self.size > len(self.ts):
            for name in _COLUMNS:
                setattr(self, name, _grown(getattr(self, name), self.size))
        raw = order_id.encode()
        self.ts[slot], self.user[slot], self.status[slot], self.stream[slot] = ts, user, status, stream
        self.start[slot], self.length[slot] = self.used_items, n
        self.id_start[slot], self.id_length[slot] = len(self.ids), len(raw)
        self.ids += raw
        if self.used_items + n > len(self.items):
            self.items = _grown(self.items, self.used_items + n)
        self.items[self.used_items : self.used_items + n] = rows
        self.used_items += n
        return slot

    def index(self, order_ids: list[str], keys: np.ndarray, slots: list[int]) -> None:
        """Make appended records findable by their (distinct) ids; ``keys``: their :func:`order_key`."""
        if not order_ids:
            return
        keys, values = np.asarray(keys, np.int64), np.asarray(slots, np.int64)
        at = self.slot_of.get(keys)
        new = at < 0
        self.slot_of.put(keys[new], values[new])
        for k in np.flatnonzero(~new).tolist():  # the hash is taken: by an earlier record of this id, or a clash
            if self._id(int(at[k])) == order_ids[k]:
                self.slot_of.set(keys[k : k + 1], values[k : k + 1])
            else:
                self.collisions[order_ids[k]] = int(values[k])

    def items_of(self, slot: int) -> np.ndarray:
        start = int(self.start[slot])
        return self.items[start : start + int(self.length[slot])]

    def placed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Placed (not cancelled) orders inside the window, oldest slot first: ``(ts, user, indptr, items)``."""
        live = np.flatnonzero((self.status[: self.size] == PLACED) & self._inside())
        lengths = self.length[live].astype(np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        take = np.repeat(self.start[live] - indptr[:-1], lengths) + np.arange(indptr[-1])
        return self.ts[live], self.user[live], indptr, self.items[take].astype(np.int64)

    def reclaim(self) -> None:
        """Drop the records outside the window once they are half the log (amortised: each record is copied
        a bounded number of times)."""
        if self.window is None or self.size < self._reclaim_at:
            return
        keep = np.flatnonzero(self._inside())
        if 2 * len(keep) > self.size:
            self._reclaim_at = 2 * self.size
            return
        self._fill(self._arrays(keep), self.newest)

    def _arrays(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        lengths, id_lengths = self.length[keep].astype(np.int64), self.id_length[keep].astype(np.int64)
        take = np.repeat(self.start[keep] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + \
            np.arange(lengths.sum())
        id_take = np.repeat(self.id_start[keep] - np.concatenate([[0], np.cumsum(id_lengths)[:-1]]), id_lengths) + \
            np.arange(id_lengths.sum())
        raw = np.frombuffer(bytes(self.ids), np.uint8) if self.ids else np.zeros(0, np.uint8)
        return {"ts": self.ts[keep], "user": self.user[keep], "status": self.status[keep],
                "stream": self.stream[keep], "length": lengths.astype(np.int32), "items": self.items[take],
                "id_length": id_lengths.astype(np.int32), "ids": raw[id_take]}

    def _fill(self, a: dict[str, np.ndarray], newest: dict[int, float]) -> None:
        """Replace every record by the given arrays (as :meth:`arrays` returns them) and index them."""
        window = self.window
        self.__init__(window)  # type: ignore[misc]
        self.newest = dict(newest)
        self.size = len(a["ts"])
        self.ts, self.user, self.status = (np.array(a[k]) for k in ("ts", "user", "status"))
        self.stream = np.array(a["stream"], np.int32)
        self.length, self.id_length = np.array(a["length"], np.int32), np.array(a["id_length"], np.int32)
        # each record's first position: the lengths before it (as long as the other columns, also when empty)
        self.start = np.cumsum(self.length, dtype=np.int64) - self.length
        self.id_start = np.cumsum(self.id_length, dtype=np.int64) - self.id_length
        self.items, self.used_items = np.array(a["items"], np.int32), len(a["items"])
        self.ids = bytearray(np.asarray(a["ids"], np.uint8).tobytes())
        self.index_all()

    def index_all(self) -> None:
        """Index every record (after the arrays were filled in bulk); an id recorded twice finds its latest."""
        order_ids = [self._id(s) for s in range(self.size)]
        keys = np.array([order_key(o) for o in order_ids], np.int64)
        unique, first_reversed = np.unique(keys[::-1], return_index=True)
        latest = len(keys) - 1 - first_reversed
        self.slot_of = KeyIndex(2 * len(keys) + 16)
        self.slot_of.put(unique, latest.astype(np.int64))
        self.collisions = {}
        held = dict(zip(unique.tolist(), latest.tolist()))
        for slot, (order_id, key) in enumerate(zip(order_ids, keys.tolist())):
            if order_ids[held[key]] != order_id:  # another id with the same hash
                self.collisions[order_id] = slot
        self._reclaim_at = max(1024, 2 * self.size)

    # ---- partitions ----------------------------------------------------------
    def of_stream(self, stream: int) -> OrderLog:
        """A log of this one's records of ``stream`` (a stream worker's checkpoint of one partition)."""
        out = OrderLog(self.window)
        keep = np.flatnonzero(self._inside() & (self.stream[: self.size] == stream))
        out._fill(self._arrays(keep), {s: t for s, t in self.newest.items() if s == stream})
        return out

    def drop_stream(self, stream: int) -> None:
        """Forget the records of ``stream`` (its partition went to another worker)."""
        keep = np.flatnonzero(self._inside() & (self.stream[: self.size] != stream))
        self._fill(self._arrays(keep), {s: t for s, t in self.newest.items() if s != stream})

    def merge(self, other: OrderLog, items: np.ndarray, users: np.ndarray) -> None:
        """Take in ``other``'s records (another store's; ``items`` and ``users``: its rows → ours)."""
        mine = self._arrays(np.flatnonzero(self._inside()))
        theirs = other._arrays(np.flatnonzero(other._inside()))
        theirs["items"] = items[theirs["items"]].astype(np.int32)
        user = np.asarray(theirs["user"], np.int64)
        theirs["user"] = np.full(len(user), -1, np.int64)
        theirs["user"][user >= 0] = users[user[user >= 0]]
        newest = dict(self.newest)
        for stream, ts in other.newest.items():
            newest[stream] = max(ts, newest.get(stream, -np.inf))
        self._fill({k: np.concatenate([mine[k], np.asarray(theirs[k], mine[k].dtype)]) for k in mine}, newest)

    # ---- snapshots -----------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The records inside the window, and each stream's newest order time, as flat arrays (a snapshot)."""
        streams = sorted(self.newest)
        return {**self._arrays(np.flatnonzero(self._inside())), "streams": np.array(streams, np.int64),
                "newest": np.array([self.newest[s] for s in streams], np.float64)}

    @classmethod
    def from_arrays(cls, window: float | None, a: dict[str, np.ndarray]) -> OrderLog:
        log = cls(window)
        log._fill(a, dict(zip(np.asarray(a["streams"]).tolist(), np.asarray(a["newest"]).tolist())))
        return log
