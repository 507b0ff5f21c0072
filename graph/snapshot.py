"""Save and load a :class:`~graph.store.GraphStore` as one versioned ``.npz`` file.

Numbers are stored as flat numpy arrays (fast to write and read, no pickle);
strings as one UTF-8 JSON blob. The snapshot id is the SHA-256 of the file, so
a model artifact can name exactly the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from graph.store import GraphConfig, GraphStore, IdMap, Item, OrderRecord, Stats
from graph.tallies import EdgeTable

FORMAT = "bundlegnn-graph"
FORMAT_VERSION = 2  # 2: weights at the decay clock's reference time (1: each at its tally's newest time)


class SnapshotError(ValueError):
    """The file is not a graph snapshot this version can read."""


def _columns(table: EdgeTable) -> dict[str, np.ndarray]:
    a, b, slots = table.edges()
    t = table.tallies
    return {"src": a, "dst": b, "count": t.count[slots], "weight": t.weight[slots], "ts": t.ts[slots]}


def save(store: GraphStore, path: str | os.PathLike[str]) -> str:
    """Write ``store`` to ``path`` atomically; return the snapshot id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order_ids = list(store.orders)
    records = list(store.orders.values())
    strings = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": store.config.model_dump(),
        "stats": store.stats.as_dict(),
        "last_ts": store.last_ts,
        "decay_ref": store.clock.ref,
        "version": store.version,
        "item_ids": store.items.ids,
        "user_ids": store.users.ids,
        "titles": [it.title for it in store.catalog],
        "descriptions": [it.description for it in store.catalog],
        "categories": [it.category for it in store.catalog],
        "order_ids": order_ids,
        "order_status": [r.status for r in records],
    }
    arrays: dict[str, np.ndarray] = {
        "strings": np.frombuffer(json.dumps(strings).encode(), np.uint8),
        "item_price": np.array([np.nan if it.price is None else it.price for it in store.catalog], np.float64),
        "item_in_stock": np.array([it.in_stock for it in store.catalog], bool),
        "item_has_text": np.array([it.has_text for it in store.catalog], bool),
        "item_updated": np.array([it.updated for it in store.catalog], np.float64),
        "order_ts": np.array([r.ts for r in records], np.float64),
        "order_user": np.array([r.user for r in records], np.int64),
        "order_ptr": np.cumsum([0] + [len(r.items) for r in records], dtype=np.int64),
        "order_items": np.array([i for r in records for i in r.items], np.int64),
    }
    n, io = store.num_items, store.item_orders
    items = np.arange(n, dtype=np.int64)
    columns = {"co_": _columns(store.co), "ui_": _columns(store.ui),
               "io_": {"src": items, "dst": items, "count": io.count[:n], "weight": io.weight[:n], "ts": io.ts[:n]}}
    for prefix, cols in columns.items():
        arrays.update({prefix + k: v for k, v in cols.items()})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return snapshot_id(path)


def snapshot_id(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the snapshot file (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load(path: str | os.PathLike[str]) -> GraphStore:
    """Read a snapshot written by :func:`save`."""
    try:
        z = np.load(path, allow_pickle=False)
        strings = json.loads(z["strings"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise SnapshotError(f"{path}: not a graph snapshot ({exc})") from exc
    version = strings.get("format_version")
    if strings.get("format") != FORMAT or version not in (1, FORMAT_VERSION):
        raise SnapshotError(
            f"{path}: format {strings.get('format')!r} v{strings.get('format_version')}, "
            f"this version reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    store = GraphStore(config=GraphConfig(**strings["config"]))
    store.items = IdMap(strings["item_ids"])
    store.users = IdMap(strings["user_ids"])
    price = z["item_price"]
    store.catalog = [
        Item(t, d, c, None if np.isnan(p) else float(p), bool(s), bool(h), float(u))
        for t, d, c, p, s, h, u in zip(
            strings["titles"], strings["descriptions"], strings["categories"], price,
            z["item_in_stock"], z["item_has_text"], z["item_updated"],
        )
    ]
    store.clock.ref = strings["last_ts"] if version == 1 else strings["decay_ref"]

    def weights(prefix: str) -> np.ndarray:
        w = z[prefix + "weight"]
        if version == 1:  # each weight was as seen at its own newest time: bring it to the reference time
            w = w * np.exp2((z[prefix + "ts"] - store.clock.ref) / store.half_life)
        return w

    store.item_orders.resize(store.num_items)
    io = store.item_orders
    io.count[: store.num_items], io.weight[: store.num_items], io.ts[: store.num_items] = (
        z["io_count"], weights("io_"), z["io_ts"])
    store.co.grow(store.num_items)
    store.ui.grow(store.num_users)
    for prefix, table in (("co_", store.co), ("ui_", store.ui)):
        table.load(z[prefix + "src"], z[prefix + "dst"], z[prefix + "count"], weights(prefix), z[prefix + "ts"])
    ptr, items = z["order_ptr"].tolist(), z["order_items"].tolist()
    store.orders = {
        oid: OrderRecord(ts, user, tuple(items[ptr[k] : ptr[k + 1]]), status)
        for k, (oid, status, ts, user) in enumerate(
            zip(strings["order_ids"], strings["order_status"], z["order_ts"].tolist(), z["order_user"].tolist())
        )
    }
    store.stats = Stats(**strings["stats"])
    store.last_ts = strings["last_ts"]
    store.version = strings["version"]
    return store
