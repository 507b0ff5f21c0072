"""Save and load a :class:`~graph.store.GraphStore` as a versioned snapshot directory.

A snapshot is a directory of ``.npy`` arrays plus ``meta.json`` (format,
config, counters, ids and catalog strings), written beside the live one and
made current atomically::

    <path>/CURRENT          names the live snapshot (replaced by rename)
    <path>/snap-<n>/        meta.json, extra.json, co_index.npy, co_count.npy, ...

Writing: the new directory is written and fsynced, then ``CURRENT`` is
replaced by a rename and older directories are removed, so a crash at any
point leaves the previous snapshot or the new one, never a mix. Loading
maps the edge arrays into memory (``mmap_mode="r"``): a snapshot of any
size loads in about the time it takes to read its ids and catalog; pages
are read when used, and merges write new arrays, never into the map.

The snapshot id is the SHA-256 of its contents, so a model artifact can name
exactly the data it was trained on. Files of format 1 and 2 (one ``.npz``
file) still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from graph.orders import OrderLog
from graph.store import GraphConfig, GraphStore, IdMap, Item, Stats
from graph.tallies import EdgeTable, Rows

T = TypeVar("T")

FORMAT = "bundlegnn-graph"
FORMAT_VERSION = 3  # 3: a directory of arrays (2: one .npz, weights at the decay clock's reference time; 1: at each
#                     tally's newest time)


class SnapshotError(ValueError):
    """The path is not a graph snapshot this version can read."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
    """Writes arrays as ``.npy`` files into a directory, hashing what it writes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.digest = hashlib.sha256()
        self.names: list[str] = []

    def write(self, name: str, parts: list[np.ndarray], dtype: Any) -> None:
        """One array, the concatenation of ``parts``, written part by part (no concatenated copy in memory)."""
        total = sum(len(p) for p in parts)
        path = self.directory / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total,))
        at = 0
        self.digest.update(f"{name}:{np.dtype(dtype).str}:{total};".encode())
        for part in parts:
            chunk = np.ascontiguousarray(part, dtype=dtype)
            out[at : at + len(chunk)] = chunk
            self.digest.update(chunk.data)
            at += len(chunk)
        out.flush()
        del out
        _fsync(path)
        self.names.append(name)


def _table(writer: _Writer, prefix: str, table: EdgeTable) -> None:
    table.compact()
    per_row = np.zeros(table.rows, np.int64)
    for k, block in enumerate(table.blocks):
        per_row[k * table.block_rows : k * table.block_rows + block.rows] = np.diff(block.indptr)
    writer.write(prefix + "indptr", [np.concatenate([[0], np.cumsum(per_row)])], np.int64)
    for column, dtype in (("index", np.int32), ("count", table.COUNT), ("weight", table.WEIGHT)):
        writer.write(prefix + column, [getattr(b, column) for b in table.blocks], dtype)


def save(store: GraphStore, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> str:
    """Write ``store`` as the current snapshot under directory ``path``; return the snapshot id.

    ``extra``: JSON-able facts written in the same atomic step (a stream worker's checkpoint keeps the input
    offsets the graph reflects there); :func:`load_with_extra` reads them back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = f"snap-{time.time_ns()}"
    tmp = path / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = _Writer(tmp)
    _table(writer, "co_", store.co)
    _table(writer, "ui_", store.ui)
    n, catalog = store.num_items, store.catalog
    writer.write("item_count", [store.item_orders.count[:n]], np.int64)
    writer.write("item_weight", [store.item_orders.weight[:n]], np.float64)
    writer.write("item_price", [np.array([np.nan if it.price is None else it.price for it in catalog])], np.float64)
    writer.write("item_in_stock", [np.array([it.in_stock for it in catalog], bool)], bool)
    writer.write("item_has_text", [np.array([it.has_text for it in catalog], bool)], bool)
    writer.write("item_updated", [np.array([it.updated for it in catalog], np.float64)], np.float64)
    for prefix, log in (("order_", store.orders), ("interaction_", store.interaction_ids)):
        for key, array in log.arrays().items():
            writer.write(prefix + key, [array], array.dtype)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": store.config.model_dump(),
        "stats": store.stats.as_dict(),
        "last_ts": store.last_ts,
        "decay_ref": store.clock.ref,
        "version": store.version,
        "item_ids": store.items.ids,
        "user_ids": store.users.ids,
        "titles": [it.title for it in catalog],
        "descriptions": [it.description for it in catalog],
        "categories": [it.category for it in catalog],
        "arrays": writer.names,
    }
    text = json.dumps(meta)
    writer.digest.update(text.encode())
    meta["id"] = writer.digest.hexdigest()[:16]
    (tmp / "meta.json").write_text(json.dumps(meta))
    _fsync(tmp / "meta.json")
    (tmp / "extra.json").write_text(json.dumps(extra or {}))  # apart from meta: cheap to read, not in the id
    _fsync(tmp / "extra.json")
    _fsync(tmp)
    os.rename(tmp, path / name)
    current = path / "CURRENT.tmp"
    current.write_text(name)
    _fsync(current)
    os.replace(current, path / "CURRENT")
    _fsync(path)
    for old in path.glob("snap-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return meta["id"]


def snapshot_id(path: str | os.PathLike[str]) -> str:
    """The id of the current snapshot under ``path`` (SHA-256 of its contents, first 16 hex digits)."""
    path = Path(path)
    if path.is_file():  # format 1 or 2
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]
    return _meta(_current(path))["id"]


def _current(path: Path) -> Path:
    try:
        name = (path / "CURRENT").read_text().strip()
    except OSError as exc:
        raise SnapshotError(f"{path}: not a graph snapshot ({exc})") from exc
    return path / name


def _meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{directory}: not a graph snapshot ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{directory}: format {meta.get('format')!r} v{meta.get('format_version')}, this version "
                            f"reads {FORMAT!r} v1 to v{FORMAT_VERSION}")
    return meta


def _store(meta: dict) -> GraphStore:
    """A store with the ids, catalog strings and counters of ``meta`` (the arrays come next)."""
    store = GraphStore(config=GraphConfig(**meta["config"]))
    store.items = IdMap(meta["item_ids"])
    store.users = IdMap(meta["user_ids"])
    store.stats = Stats(**meta["stats"])
    store.last_ts = meta["last_ts"]
    store.version = meta["version"]
    store.co.grow(store.num_items)
    store.ui.grow(store.num_users)
    store.item_orders.resize(store.num_items)
    store.partition(None)  # a partitioned store's reader partitions it again (GraphStore.partition)
    return store


def _catalog(meta: dict, price: np.ndarray, in_stock: np.ndarray, has_text: np.ndarray,
             updated: np.ndarray) -> list[Item]:
    return [Item(t, d, c, None if np.isnan(p) else float(p), bool(s), bool(h), float(u))
            for t, d, c, p, s, h, u in zip(meta["titles"], meta["descriptions"], meta["categories"], price.tolist(),
                                           in_stock.tolist(), has_text.tolist(), updated.tolist())]


def load(path: str | os.PathLike[str]) -> GraphStore:
    """Read the current snapshot under ``path`` (or a format 1/2 ``.npz`` file)."""
    path = Path(path)
    return _load_npz(path) if path.is_file() else load_with_extra(path)[0]


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` facts of the current snapshot under ``path`` (without reading the snapshot itself)."""
    return _read_current(Path(path), _extra)


def load_with_extra(path: str | os.PathLike[str]) -> tuple[GraphStore, dict[str, Any]]:
    """The current snapshot under directory ``path`` and the ``extra`` facts written with it."""

    def read(directory: Path) -> tuple[GraphStore, dict[str, Any]]:
        meta, extra = _meta(directory), _extra(directory)
        a = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
             for name in meta["arrays"]}  # mapped: the arrays stay readable if the files are removed now
        return _from_arrays(meta, a), extra

    return _read_current(Path(path), read)


def _read_current(path: Path, read: Callable[[Path], T]) -> T:
    """``read`` of the current snapshot's directory, again when a writer made a newer one current and removed this
    one (or is removing it: its files go before the directory) while it was read (a worker writes checkpoints
    while others read them)."""
    for _ in range(10):
        directory = _current(path)
        try:
            return read(directory)
        except (OSError, ValueError) as exc:
            if not directory.is_dir() or _current(path) != directory:
                continue  # replaced meanwhile, and removed or being removed
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"{directory}: unreadable ({exc})") from exc
    raise SnapshotError(f"{path}: the current snapshot kept changing while it was read")


def _extra(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "extra.json").read_text())
    except FileNotFoundError:
        if directory.is_dir():  # written before extra facts existed
            return {}
        raise  # replaced and removed meanwhile: read again


def _from_arrays(meta: dict, a: dict[str, np.ndarray]) -> GraphStore:
    store = _store(meta)
    store.clock.ref = meta["decay_ref"]
    n = store.num_items
    store.item_orders.count[:n], store.item_orders.weight[:n] = a["item_count"], a["item_weight"]
    store.catalog = _catalog(meta, a["item_price"], a["item_in_stock"], a["item_has_text"], a["item_updated"])
    for prefix, table in (("co_", store.co), ("ui_", store.ui)):
        table.load(Rows(np.array(a[prefix + "indptr"]), a[prefix + "index"], a[prefix + "count"],
                        a[prefix + "weight"]))
    store.orders = OrderLog.from_arrays(store.orders.window, {k[6:]: v for k, v in a.items() if k.startswith("order_")})
    seen = {k[12:]: v for k, v in a.items() if k.startswith("interaction_")}
    if seen:  # (snapshots before interaction ids have none)
        store.interaction_ids = OrderLog.from_arrays(store.interaction_ids.window, seen)
    return store


def _load_npz(path: Path) -> GraphStore:
    """A format 1 or 2 snapshot: one ``.npz`` of edge lists, every order kept."""
    try:
        z = np.load(path, allow_pickle=False)
        strings = json.loads(z["strings"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{path}: not a graph snapshot ({exc})") from exc
    version = strings.get("format_version")
    if strings.get("format") != FORMAT or version not in (1, 2):
        raise SnapshotError(f"{path}: format {strings.get('format')!r} v{version}, this version reads "
                            f"{FORMAT!r} v1 to v{FORMAT_VERSION}")
    meta = {**strings, "stats": {**Stats().as_dict(), **strings["stats"]}}
    store = _store(meta)
    store.clock.ref = strings["last_ts"] if version == 1 else strings["decay_ref"]

    def weights(prefix: str) -> np.ndarray:
        w = z[prefix + "weight"]
        if version == 1:  # each weight was as seen at its own newest time: bring it to the reference time
            w = w * np.exp2((z[prefix + "ts"] - store.clock.ref) / store.half_life)
        return w

    n = store.num_items
    store.item_orders.count[:n], store.item_orders.weight[:n] = z["io_count"], weights("io_")
    store.catalog = _catalog(strings, z["item_price"], z["item_in_stock"], z["item_has_text"], z["item_updated"])
    for prefix, table, rows, symmetric in (("co_", store.co, n, True), ("ui_", store.ui, store.num_users, False)):
        src, dst, count, weight = z[prefix + "src"], z[prefix + "dst"], z[prefix + "count"], weights(prefix)
        if symmetric:
            src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
            count, weight = np.concatenate([count, count]), np.concatenate([weight, weight])
        order = np.lexsort((dst, src))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=rows))])
        table.load(Rows(indptr.astype(np.int64), dst[order].astype(np.int32), count[order].astype(table.COUNT),
                        weight[order].astype(table.WEIGHT)))
    ptr, items = z["order_ptr"], z["order_items"]
    log = store.orders
    status = {"placed": 1, "cancelled": 2}
    for k, (oid, st, ts, user) in enumerate(zip(strings["order_ids"], strings["order_status"], z["order_ts"].tolist(),
                                                z["order_user"].tolist())):
        log.seen(ts)
        log.append(oid, ts, user, items[ptr[k] : ptr[k + 1]], status[st])
    log.index_all()
    return store
