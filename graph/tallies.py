"""Counts and time-decayed weights of edges, kept as sorted sparse rows in flat arrays.

An order of ``n`` items changes ``n (n - 1) / 2`` co-purchase pairs (about
1,100 per order on Online Retail II), and a shop of 200k items holds
hundreds of millions of them. So an edge is no object at all: a table is
CSR-style arrays (for each row, its neighbours' column ids sorted, with a
count and a weight per entry: 12 bytes an entry, 24 bytes a co-purchase
pair stored from both ends), split into blocks of rows, plus a write buffer
of pending changes in the same form.

The buffer is a few sorted runs, as in a log-structured merge tree (O'Neil
et al., "The Log-Structured Merge-Tree", Acta Informatica 1996): a batch of
changes becomes a run, and runs of similar size are merged, so a change is
rewritten about log(runs) times instead of once per batch. Once the buffer
holds an eighth of what the blocks hold it is merged into them, one block
at a time (spare memory: one block). Reads add an entry's buffered changes
to its stored value.

A merge finds the union of two sparse patterns with scipy's compiled CSR
addition (:func:`_union`) and then inserts and adds the smaller side's
entries, so it runs at memory speed. Blocks are merged on :data:`THREADS`
threads: scipy and numpy release the GIL in these loops (measured on 2
cores: a compaction 25 % faster, and the core the CSV reader leaves idle is
used).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from graph.store import DecayClock

T, R = TypeVar("T"), TypeVar("R")


THREADS = min(4, os.cpu_count() or 1)  # threads that merge blocks and multiply a batch's halves (graph.store)


def on_threads(fn: Callable[[T], R], jobs: Sequence[T], name: str) -> list[R]:
    """``[fn(job) for job in jobs]`` on up to :data:`THREADS` threads (for work that releases the GIL: scipy's
    and numpy's compiled loops); a job's exception is raised here."""
    if THREADS == 1 or len(jobs) < 2:
        return [fn(job) for job in jobs]
    with ThreadPoolExecutor(min(THREADS, len(jobs)), thread_name_prefix=name) as pool:
        return list(pool.map(fn, jobs))


@dataclass(frozen=True, slots=True)
class Tally:
    """One tally read out: a count plus a weight kept at its clock's reference time."""

    count: int
    weight: float  # at the clock's reference time
    ts: float  # the time of the newest event in its store: reads never decay to a time before it

    def value(self, now: float, clock: DecayClock) -> float:
        """The weight as seen at time ``now`` (never in the future of the newest event)."""
        weight = self.weight if self.weight > 0.0 else 0.0  # a full take-back may leave rounding dust
        return weight * clock.scale(now if now > self.ts else self.ts) if weight else 0.0


class Tallies:
    """``count`` and ``weight`` columns indexed by a dense id (an item's placed orders), growing on demand."""

    __slots__ = ("count", "weight", "size")

    def __init__(self) -> None:
        self.count = np.zeros(0, np.int64)
        self.weight = np.zeros(0, np.float64)
        self.size = 0  # ids below this are in use

    def resize(self, size: int) -> None:
        """Make ids ``0 .. size-1`` valid; new ones start at zero."""
        if size > len(self.count):
            capacity = max(size, 2 * len(self.count), 1024)
            for name in ("count", "weight"):
                old = getattr(self, name)
                new = np.zeros(capacity, old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)
        self.size = max(self.size, size)

    def add(self, ids: np.ndarray, count: np.ndarray, weight: np.ndarray) -> None:
        """Add to the counts and weights of ``ids`` (repeated ids add up)."""
        np.add.at(self.count, ids, count)
        np.add.at(self.weight, ids, weight)

    def rescale(self, factor: float) -> None:
        """Multiply every weight (the decay clock moved its reference time)."""
        self.weight[: self.size] *= factor


class KeyIndex:
    """An open-addressing hash map from int64 keys (≥ 0) to int64 values, read and written in bulk.

    Linear probing with Fibonacci hashing (Knuth, TAOCP vol. 3, 6.4), kept at
    most half full; deleted keys leave tombstones until the next resize. A
    batch of lookups is a few vectorised gathers per probe step instead of a
    Python dict lookup per key.
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
            free = self.keys[p] < 0  # empty or a tombstone
            buckets, first = np.unique(p[free], return_index=True)  # one winner per free bucket
            won = todo[free][first]
            self.used += int((self.keys[buckets] == self.EMPTY).sum())
            self.keys[buckets], self.values[buckets] = keys[won], values[won]
            placed = np.zeros(len(keys), bool)
            placed[won] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask
        self.size += len(keys)

    def set(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Change the values of keys that are present."""
        pos = self._find(keys)
        self.values[pos[pos >= 0]] = values[pos >= 0]

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


@dataclass(slots=True)
class Rows:
    """Sparse rows over a range of row ids: for row ``r``, entries ``indptr[r]:indptr[r+1]`` of ``index``
    (column ids, increasing), ``count`` and ``weight``."""

    indptr: np.ndarray  # int64, rows + 1
    index: np.ndarray  # int32
    count: np.ndarray
    weight: np.ndarray

    @classmethod
    def empty(cls, rows: int, count: type = np.int64, weight: type = np.float64) -> Rows:
        return cls(np.zeros(rows + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, count), np.zeros(0, weight))

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.indptr, self.index, self.count, self.weight))

    def slice(self, start: int, stop: int) -> Rows:
        """Rows ``start .. stop-1`` (views of the entry arrays)."""
        stop = min(stop, self.rows)
        if start >= stop:
            return Rows.empty(0, self.count.dtype, self.weight.dtype)
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return Rows(self.indptr[start : stop + 1] - lo, self.index[lo:hi], self.count[lo:hi], self.weight[lo:hi])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if r >= self.rows:
            return self.index[:0], self.count[:0], self.weight[:0]
        lo, hi = int(self.indptr[r]), int(self.indptr[r + 1])
        return self.index[lo:hi], self.count[lo:hi], self.weight[lo:hi]

    @classmethod
    def from_matrix(cls, m: sp.csr_matrix) -> Rows:
        """Sparse rows from a CSR matrix of complex numbers ``count + i·weight`` (what :mod:`graph.store` builds)."""
        m.sum_duplicates()  # sorted indices, duplicates summed
        keep = m.data != 0
        indptr = np.concatenate([[0], np.cumsum(keep)])[m.indptr] if not keep.all() else m.indptr.astype(np.int64)
        data = m.data[keep]
        return cls(indptr.astype(np.int64), m.indices[keep].astype(np.int32), np.rint(data.real).astype(np.int32),
                   data.imag.astype(np.float32))


def _pattern(rows: Rows, cols: int, mark: int) -> sp.csr_matrix:
    m = sp.csr_matrix((np.full(len(rows.index), mark, np.int8), rows.index, rows.indptr), shape=(rows.rows, cols),
                      copy=False)
    m.has_sorted_indices = True
    m.has_canonical_format = True
    return m


def _pad(rows: Rows, n: int) -> Rows:
    if rows.rows == n:
        return rows
    return Rows(np.pad(rows.indptr, (0, n - rows.rows), mode="edge"), rows.index, rows.count, rows.weight)


def _union(a: Rows, b: Rows, count: type, weight: type, drop: str) -> Rows:
    """``a + b`` entry by entry, in the dtypes given; ``drop``: ``"empty"`` removes entries whose count and
    weight are both 0 (a buffer of changes), ``"gone"`` those whose count is not positive (stored edges).

    Only entries ``b`` touches can change: ``a``'s arrays are copied once with ``b``'s new entries
    placed between them, then ``b``'s other entries are added in place and emptied ones removed.
    """
    rows = max(a.rows, b.rows)
    a, b = _pad(a, rows), _pad(b, rows)
    cols = int(max(a.index.max(initial=-1), b.index.max(initial=-1))) + 1
    u = _pattern(a, cols, 1) + _pattern(b, cols, 2)  # compiled merge of sorted rows: 1 = in a, 2 = in b, 3 = both
    from_a = u.data != 2
    at = np.flatnonzero(u.data >= 2)  # where b's entries land, in b's order
    new = u.data[at] == 2
    index, c, w = np.empty(u.nnz, np.int32), np.empty(u.nnz, count), np.empty(u.nnz, weight)
    for out, mine, theirs in ((index, a.index, b.index), (c, a.count, b.count), (w, a.weight, b.weight)):
        out[from_a] = mine
        out[at[new]] = theirs[new]
    hit = at[~new]
    c[hit] += b.count[~new].astype(count, copy=False)
    w[hit] += b.weight[~new].astype(weight, copy=False)
    indptr = u.indptr.astype(np.int64)
    gone = at[c[at] <= 0] if drop == "gone" else at[(c[at] == 0) & (w[at] == 0)]
    if len(gone):
        per_row = np.bincount(np.searchsorted(indptr, gone, side="right") - 1, minlength=rows)
        indptr = indptr - np.concatenate([[0], np.cumsum(per_row)])
        keep = np.ones(u.nnz, bool)
        keep[gone] = False
        index, c, w = index[keep], c[keep], w[keep]
    return Rows(indptr, index, c, w)


class EdgeTable:
    """Counts and decayed weights of edges between dense row and column ids.

    ``symmetric`` (item–item co-purchases): every edge is stored at both
    ends, so a row lists all of an item's neighbours. Otherwise (user–item)
    rows are the sources. Entries are ``int32`` counts and ``float32``
    weights, in blocks of ``block_rows`` rows and in the buffer's runs of
    changes. An edge whose count falls to zero (its orders were cancelled)
    is gone.
    """

    __slots__ = ("symmetric", "block_rows", "blocks", "runs", "rows", "min_buffer")

    COUNT, WEIGHT = np.int32, np.float32
    BUFFER_SHARE = 8  # the buffer is merged into the blocks once it holds 1/BUFFER_SHARE of their entries

    def __init__(self, symmetric: bool, block_rows: int = 4096, min_buffer: int = 1 << 20) -> None:
        self.symmetric = symmetric
        self.block_rows = block_rows
        self.min_buffer = min_buffer  # entries the buffer may hold however small the table
        self.blocks: list[Rows] = []
        self.runs: list[Rows] = []  # the buffer: sorted runs of changes, each at most half the one before
        self.rows = 0  # valid row ids are 0 .. rows-1

    # ---- sizes -------------------------------------------------------------
    def __len__(self) -> int:
        """Edges (a symmetric edge counts once); merges the buffer first."""
        self.compact()
        stored = sum(b.nnz for b in self.blocks)
        return stored // 2 if self.symmetric else stored

    @property
    def stored(self) -> int:
        """Entries in the blocks and the buffer (cheap; not an edge count)."""
        return sum(b.nnz for b in self.blocks) + sum(r.nnz for r in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks) + sum(r.nbytes for r in self.runs)

    def grow(self, rows: int) -> None:
        """Make rows ``0 .. rows-1`` valid."""
        self.rows = max(self.rows, rows)

    # ---- writing -----------------------------------------------------------
    def add(self, change: Rows) -> None:
        """Add a batch of changes: per entry a signed count and a weight already scaled by the decay clock.

        A symmetric table takes both directions of each edge in ``change``.
        """
        if not change.nnz:
            return
        self.grow(change.rows)
        runs = self.runs
        runs.append(change)
        while len(runs) > 1 and runs[-2].nnz <= 2 * runs[-1].nnz:
            last = runs.pop()
            runs[-1] = _union(runs[-1], last, self.COUNT, self.WEIGHT, "empty")
        if sum(r.nnz for r in runs) > max(self.min_buffer, sum(b.nnz for b in self.blocks) // self.BUFFER_SHARE):
            self.compact()

    def compact(self) -> None:
        """Merge the write buffer into the blocks, one block at a time."""
        runs, self.runs = self.runs, []
        if not runs:
            return
        buffer = runs[-1]
        for run in reversed(runs[:-1]):
            buffer = _union(run, buffer, self.COUNT, self.WEIGHT, "empty")
        size = self.block_rows
        while len(self.blocks) * size < buffer.rows:
            self.blocks.append(Rows.empty(0, self.COUNT, self.WEIGHT))
        todo = [(k, buffer.slice(k * size, (k + 1) * size)) for k in range(len(self.blocks))]
        todo = [(k, part) for k, part in todo if part.nnz]

        def merge(job: tuple[int, Rows]) -> None:
            k, part = job
            self.blocks[k] = _union(self.blocks[k], part, self.COUNT, self.WEIGHT, "gone")

        on_threads(merge, todo, "compact")

    def rescale(self, factor: float) -> None:
        """Multiply every weight (the decay clock moved its reference time)."""
        for run in self.runs:
            run.weight = run.weight * factor
        for block in self.blocks:
            block.weight = (block.weight * factor).astype(self.WEIGHT)

    # ---- reading -----------------------------------------------------------
    def neighbours(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Column ids, counts and weights (at the clock's reference time) of the live edges at ``row``,
        columns increasing."""
        k, local = divmod(row, self.block_rows)
        index, count, weight = self.blocks[k].row(local) if k < len(self.blocks) else Rows.empty(0).row(0)
        changes = [run.row(row) for run in self.runs]
        changes = [c for c in changes if len(c[0])]
        if not changes:
            return index, count, weight
        index, inverse = np.unique(np.concatenate([index, *(c[0] for c in changes)]), return_inverse=True)
        count = np.bincount(inverse, np.concatenate([count, *(c[1] for c in changes)]), len(index))
        weight = np.bincount(inverse, np.concatenate([weight, *(c[2] for c in changes)]), len(index))
        live = count > 0.5
        return index[live], count[live].round().astype(np.int64), weight[live]

    def get(self, a: int, b: int) -> tuple[int, float] | None:
        """Count and weight of edge ``a``–``b``, or None."""
        if not 0 <= a < self.rows:
            return None
        index, count, weight = self.neighbours(a)
        at = int(np.searchsorted(index, b))
        if at < len(index) and index[at] == b:
            return int(count[at]), float(weight[at])
        return None

    def load(self, rows: Rows) -> None:
        """Replace everything by ``rows`` (a snapshot being read): blocks become views of its arrays, which may
        be read-only memory maps (a merge writes new arrays)."""
        self.blocks = [rows.slice(k, k + self.block_rows) for k in range(0, rows.rows, self.block_rows)]
        self.runs = []
        self.rows = max(self.rows, rows.rows)

    def select(self, rows: np.ndarray | None = None, columns: np.ndarray | None = None) -> Rows:
        """The entries in kept ``rows`` and ``columns`` (boolean masks; None keeps all), over every row id: one
        partition's share of the table, which :meth:`load` (or :meth:`add`, rows renumbered) takes."""
        self.compact()
        per_row, parts = np.zeros(self.rows, np.int64), []
        for k, block in enumerate(self.blocks):
            lo, lengths = k * self.block_rows, np.diff(block.indptr)
            keep = np.ones(block.nnz, bool)
            if rows is not None:
                keep &= np.repeat(rows[lo : lo + block.rows], lengths)
            if columns is not None:
                keep &= columns[block.index]
            line = np.repeat(np.arange(block.rows), lengths)[keep]
            per_row[lo : lo + block.rows] = np.bincount(line, minlength=block.rows)
            parts.append((block.index[keep], block.count[keep], block.weight[keep]))
        index, count, weight = (np.concatenate(c) if parts else np.zeros(0, t) for c, t in
                                zip(zip(*parts) if parts else ((), (), ()), (np.int32, self.COUNT, self.WEIGHT)))
        return Rows(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64), index.astype(np.int32),
                    count.astype(self.COUNT), weight.astype(self.WEIGHT))

    def csr(self, size: int, values: str = "count", scale: float = 1.0,
            diagonal: np.ndarray | None = None) -> sp.csr_matrix:
        """A symmetric table as a ``size`` × ``size`` float32 CSR matrix with int32 column indices: ``values``
        ``"count"`` or ``"weight"`` (times ``scale``); with ``diagonal`` (``size`` values), each row's value
        stored on its diagonal (explicitly, zeros too).

        Filled block by block into arrays of the final size (8 bytes per stored entry), so building it holds
        the matrix and one block besides the table: a large shop's co-purchase matrix has hundreds of millions
        of entries, and going through :meth:`edges` (int64 pairs, float64 values) and a COO matrix took about
        five times the matrix's size on the way."""
        self.compact()
        spans = [(k * self.block_rows, block) for k, block in enumerate(self.blocks)]
        n = max([size, self.rows] + [lo + b.rows for lo, b in spans])
        extra = 0 if diagonal is None else 1
        lengths = np.zeros(n, np.int64)
        for lo, block in spans:
            lengths[lo : lo + block.rows] = np.diff(block.indptr)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(lengths + extra, out=indptr[1:])
        index = np.empty(int(indptr[-1]), np.int32)
        data = np.empty(int(indptr[-1]), np.float32)
        below = np.zeros(n, np.int64)  # each row's columns below its diagonal
        for lo, block in spans:
            lens = np.diff(block.indptr)
            line = np.repeat(np.arange(lo, lo + block.rows), lens)  # each entry's row
            at = indptr[line] + np.arange(block.nnz) - np.repeat(block.indptr[:-1], lens)
            if diagonal is not None:
                at += block.index > line
                below[lo : lo + block.rows] = np.bincount(line - lo, block.index < line, block.rows)
            index[at] = block.index
            data[at] = block.count if values == "count" else np.maximum(block.weight, 0) * np.float32(scale)
        if diagonal is not None:  # each row's diagonal slot: after its columns below the row
            slot = indptr[:-1] + below
            index[slot] = np.arange(n, dtype=np.int32)
            data[slot] = np.asarray(diagonal, np.float32)[:n]
        return sp.csr_matrix((data, index, indptr), shape=(n, n))

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every edge ``(a, b, count, weight)`` ordered by ``(a, b)``; symmetric ones once, with ``a < b``."""
        self.compact()
        parts: list[tuple[np.ndarray, ...]] = []
        for k, block in enumerate(self.blocks):
            a = np.repeat(np.arange(k * self.block_rows, k * self.block_rows + block.rows, dtype=np.int64),
                          np.diff(block.indptr))
            b = block.index.astype(np.int64)
            keep = b > a if self.symmetric else slice(None)
            parts.append((a[keep], b[keep], block.count[keep].astype(np.int64), block.weight[keep].astype(np.float64)))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return tuple(np.concatenate(cols) for cols in zip(*parts))  # type: ignore[return-value]
