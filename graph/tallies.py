"""Counts and time-decayed weights of items and edges, kept in flat arrays and updated in bulk.

An order of ``n`` items changes ``n (n - 1) / 2`` co-purchase pairs: about
450 per order on Online Retail II. A Python object per pair made that the
stream worker's hottest loop (0.45 µs a pair, and the garbage collector
walking millions of small objects). Here a pair is a row ("slot") of three
numpy arrays, found through one dict lookup, and a batch of orders is added
with numpy scatter-adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from graph.store import DecayClock

_SHIFT = np.int64(32)  # an edge's key: (a << 32) | b; row ids stay far below 2**31


@dataclass(frozen=True, slots=True)
class Tally:
    """One tally read out: a count plus a weight kept at its clock's reference time."""

    count: int
    weight: float  # at the clock's reference time
    ts: float  # the newest observation

    def value(self, now: float, clock: DecayClock) -> float:
        """The weight as seen at time ``now`` (never in the future of its newest observation)."""
        weight = self.weight if self.weight > 0.0 else 0.0  # a full take-back may leave rounding dust
        return weight * clock.scale(now if now > self.ts else self.ts) if weight else 0.0


class Tallies:
    """``count``, ``weight`` and ``ts`` columns indexed by a dense id, growing on demand."""

    __slots__ = ("count", "weight", "ts", "size")

    def __init__(self) -> None:
        self.count = np.zeros(0, np.int64)
        self.weight = np.zeros(0, np.float64)
        self.ts = np.zeros(0, np.float64)
        self.size = 0  # ids below this are in use (or free, for an edge table)

    def resize(self, size: int) -> None:
        """Make ids ``0 .. size-1`` valid; new ones start at zero."""
        if size > len(self.count):
            capacity = max(size, 2 * len(self.count), 1024)
            for name in ("count", "weight", "ts"):
                old = getattr(self, name)
                new = np.zeros(capacity, old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)
        self.size = max(self.size, size)

    def add(self, ids: np.ndarray, sign: np.ndarray, amount: np.ndarray, ts: np.ndarray) -> None:
        """Add ``sign`` to counts and ``sign * amount`` to weights; keep the newest ``ts``. Repeated ids add up."""
        np.add.at(self.count, ids, sign)
        np.add.at(self.weight, ids, sign * amount)
        np.maximum.at(self.ts, ids, ts)

    def get(self, i: int) -> Tally:
        return Tally(int(self.count[i]), float(self.weight[i]), float(self.ts[i]))

    def clear(self, ids: np.ndarray) -> None:
        self.count[ids], self.weight[ids], self.ts[ids] = 0, 0.0, 0.0

    def rescale(self, factor: float) -> None:
        """Multiply every weight (the decay clock moved its reference time)."""
        self.weight[: self.size] *= factor


class KeyIndex:
    """An open-addressing hash map from int64 keys (≥ 0) to int64 values, read and written in bulk.

    Linear probing with Fibonacci hashing (Knuth, TAOCP vol. 3, 6.4), kept at
    most half full; deleted keys leave tombstones until the next resize. A
    batch of lookups is a few vectorised gathers per probe step instead of a
    Python dict lookup per key (about 10× faster for a batch of orders' pairs).
    """

    __slots__ = ("keys", "values", "size", "used", "_shift")

    EMPTY, DELETED = -1, -2

    def __init__(self, capacity: int = 1024) -> None:
        bits = max(4, int(capacity - 1).bit_length())
        self.keys = np.full(1 << bits, self.EMPTY, np.int64)
        self.values = np.zeros(1 << bits, np.int64)
        self._shift = np.uint64(64 - bits)
        self.size = 0  # live keys
        self.used = 0  # live keys and tombstones

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> self._shift).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """The bucket of each key, -1 where absent."""
        mask = len(self.keys) - 1
        pos = self._home(keys)
        out = np.full(len(keys), -1, np.int64)
        todo = np.arange(len(keys))
        while len(todo):
            at = self.keys[pos[todo]]
            hit = at == keys[todo]
            out[todo[hit]] = pos[todo[hit]]
            todo = todo[~hit & (at != self.EMPTY)]
            pos[todo] = (pos[todo] + 1) & mask
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where absent."""
        pos = self._find(keys)
        return np.where(pos >= 0, self.values[pos], -1)

    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert keys that are distinct and absent."""
        if 2 * (self.used + len(keys)) > len(self.keys):
            self._resize(2 * (self.size + len(keys)))
        mask = len(self.keys) - 1
        pos = self._home(keys)
        todo = np.arange(len(keys))
        while len(todo):
            p = pos[todo]
            free = self.keys[p] == self.EMPTY
            buckets, first = np.unique(p[free], return_index=True)  # one winner per free bucket
            won = todo[free][first]
            self.keys[buckets], self.values[buckets] = keys[won], values[won]
            placed = np.zeros(len(keys), bool)
            placed[won] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask
        self.size += len(keys)
        self.used += len(keys)

    def delete(self, keys: np.ndarray) -> None:
        """Remove keys that are present."""
        pos = self._find(keys)
        self.keys[pos[pos >= 0]] = self.DELETED
        self.size -= int((pos >= 0).sum())

    def _resize(self, capacity: int) -> None:
        live = self.keys >= 0
        keys, values = self.keys[live], self.values[live]
        self.__init__(2 * capacity)  # type: ignore[misc]
        self.put(keys, values)


class EdgeTable:
    """Tallies of edges between dense row ids: ``symmetric`` for item–item, else source → target.

    Each row keeps its neighbours and their edges' slots in ``tallies`` as
    numpy chunks, one appended per batch that added edges at the row and
    merged when read (:meth:`neighbours`): adding a batch's new edges costs
    a sort and one append per row they touch, not Python work per edge (a
    dict per row made allocating 28 % of applying orders). A symmetric edge
    is one slot reachable from both ends. An edge whose count falls to zero
    (its orders were cancelled) is removed and its slot reused.
    """

    __slots__ = ("symmetric", "slot", "chunks", "degree", "tallies", "keys", "free")

    def __init__(self, symmetric: bool) -> None:
        self.symmetric = symmetric
        self.slot = KeyIndex()  # (a << 32) | b → slot
        self.chunks: list[list[tuple[np.ndarray, np.ndarray]]] = []  # row → [(neighbour rows, slots), ...]
        self.degree = np.zeros(0, np.int64)  # row → edges at it
        self.tallies = Tallies()
        self.keys = np.zeros(0, np.int64)  # slot → key
        self.free: list[int] = []

    def __len__(self) -> int:
        """Edges (a symmetric edge counts once)."""
        return self.slot.size

    @property
    def rows(self) -> int:
        """Valid row ids are ``0 .. rows-1``."""
        return len(self.chunks)

    def grow(self, rows: int) -> None:
        """Make rows ``0 .. rows-1`` valid ends."""
        if rows > len(self.chunks):
            self.chunks.extend([] for _ in range(rows - len(self.chunks)))
            if rows > len(self.degree):
                degree = np.zeros(max(rows, 2 * len(self.degree), 1024), np.int64)
                degree[: len(self.degree)] = self.degree
                self.degree = degree

    def _key(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.symmetric:
            a, b = np.minimum(a, b), np.maximum(a, b)
        return (a << _SHIFT) | b, a, b

    def update(self, a: np.ndarray, b: np.ndarray, sign: np.ndarray, amount: np.ndarray, ts: np.ndarray) -> None:
        """Add (``sign`` 1) or take back (-1) one observation per edge ``a[k]–b[k]``.

        ``amount`` is already scaled by the decay clock. Taking back an edge
        that does not exist changes nothing.
        """
        if not len(a):
            return
        keys, a, b = self._key(np.asarray(a, np.int64), np.asarray(b, np.int64))
        slots = self.slot.get(keys)
        missing = slots < 0
        if missing.any():
            # one slot per absent edge that the batch adds to; its later take-backs in the batch go there too
            absent, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
            adds = np.zeros(len(absent), bool)
            adds[inverse[sign[missing] > 0]] = True
            if adds.any():
                created = np.full(len(absent), -1, np.int64)
                at = first[adds]
                created[adds] = self._allocate(absent[adds], a[missing][at], b[missing][at])
                slots[missing] = created[inverse]
            keep = slots >= 0
            if not keep.all():
                slots, sign, amount, ts = slots[keep], sign[keep], amount[keep], ts[keep]
        self.tallies.add(slots, sign, amount, ts)
        gone = slots[self.tallies.count[slots] <= 0]
        if len(gone):
            self._remove(np.unique(gone))

    def _ends(self, a: np.ndarray, b: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row, neighbour, slot)`` of edges seen from each end they are listed at."""
        if self.symmetric:
            return np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([slots, slots])
        return a, b, slots

    def _allocate(self, keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        reuse = min(len(self.free), len(keys))
        slots = [self.free.pop() for _ in range(reuse)]
        start = self.tallies.size
        slots += range(start, start + len(keys) - reuse)
        self.tallies.resize(start + len(keys) - reuse)
        if len(self.keys) < len(self.tallies.count):
            self.keys = np.concatenate([self.keys, np.zeros(len(self.tallies.count) - len(self.keys), np.int64)])
        out = np.asarray(slots, np.int64)
        self.keys[out] = keys
        self.slot.put(keys, out)
        rows, nbrs, ends = self._ends(a, b, out)
        # numpy sorts 16-bit keys by radix, 8x faster than int64 here (840 k ends): most catalogs fit
        order = np.argsort(rows.astype(np.uint16) if len(self.chunks) <= 1 << 16 else rows, kind="stable")
        rows, nbrs, ends = rows[order], nbrs[order], ends[order]
        nbrs.flags.writeable = ends.flags.writeable = False  # neighbours() hands out views
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        stops = np.r_[starts[1:], len(rows)]
        self.degree[rows[starts]] += stops - starts
        chunks = self.chunks
        for row, i, j in zip(rows[starts].tolist(), starts.tolist(), stops.tolist()):
            chunks[row].append((nbrs[i:j], ends[i:j]))
        return out

    def _remove(self, slots: np.ndarray) -> None:
        keys = self.keys[slots]
        self.slot.delete(keys)
        rows, _, _ = self._ends(keys >> _SHIFT, keys & np.int64(0xFFFFFFFF), slots)
        np.subtract.at(self.degree, rows, 1)
        for row in np.unique(rows).tolist():
            nbrs, ends = self.neighbours(row)
            keep = ~np.isin(ends, slots)
            kept = (nbrs[keep], ends[keep])
            for array in kept:
                array.flags.writeable = False
            self.chunks[row] = [kept]
        self.free.extend(slots.tolist())
        self.tallies.clear(slots)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every edge ``(a, b, slot)``, ordered by ``(a, b)``; symmetric ones once with ``a < b``."""
        live = self.slot.keys >= 0
        keys, slots = self.slot.keys[live], self.slot.values[live]
        order = np.argsort(keys)
        keys, slots = keys[order], slots[order]
        return keys >> _SHIFT, keys & np.int64(0xFFFFFFFF), slots

    def load(self, a: np.ndarray, b: np.ndarray, count: np.ndarray, weight: np.ndarray, ts: np.ndarray) -> None:
        """Replace every edge by the given ones (a snapshot being read)."""
        self.slot, self.free, self.tallies, self.keys = KeyIndex(len(a)), [], Tallies(), np.zeros(0, np.int64)
        self.chunks = [[] for _ in self.chunks]
        self.degree = np.zeros_like(self.degree)
        keys, a, b = self._key(np.asarray(a, np.int64), np.asarray(b, np.int64))
        self._allocate(keys, a, b)
        n = len(keys)
        self.tallies.count[:n], self.tallies.weight[:n], self.tallies.ts[:n] = count, weight, ts

    def neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour rows of ``row`` and their edges' slots (read-only arrays)."""
        chunks = self.chunks[row]
        if len(chunks) != 1:
            merged = (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])) if chunks \
                else (np.zeros(0, np.int64), np.zeros(0, np.int64))
            for array in merged:
                array.flags.writeable = False
            self.chunks[row] = [merged]
            return merged
        return chunks[0]

    def slots_of(self, row: int) -> dict[int, int]:
        """Neighbour row → edge slot of ``row`` (a dict: for tests and one-off reads, not hot paths)."""
        nbrs, slots = self.neighbours(row)
        return dict(zip(nbrs.tolist(), slots.tolist()))

    def get(self, a: int, b: int) -> Tally | None:
        """The tally of edge ``a``–``b``, or None."""
        if not (0 <= a < len(self.chunks) and 0 <= b < (len(self.chunks) if self.symmetric else 1 << 31)):
            return None
        key, _, _ = self._key(np.array([a], np.int64), np.array([b], np.int64))
        slot = int(self.slot.get(key)[0])
        return None if slot < 0 else self.tallies.get(slot)

    def degrees(self) -> np.ndarray:
        """Edges at each row."""
        return self.degree[: len(self.chunks)].copy()
