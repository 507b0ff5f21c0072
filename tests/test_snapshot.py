"""Snapshots: a saved and loaded store equals the original, loads memory-mapped, is replaced atomically,
older formats still load, and bad files fail clearly."""

from __future__ import annotations

import json
import time
import shutil
from pathlib import Path

import numpy as np
import pytest

from graph.events import Order, OrderLine
from graph.snapshot import SnapshotError, load, save, snapshot_id
from graph.store import GraphConfig, GraphStore
from tests.conftest import RETAIL_II, retail_events


def _state(store: GraphStore) -> dict:
    log = store.orders
    return {
        "config": store.config.model_dump(),
        "items": store.items.ids,
        "users": store.users.ids,
        "catalog": store.catalog,
        "item_orders": (store.item_order_counts().tolist(), store.item_orders.weight[: store.num_items].tolist()),
        "co": [np.concatenate(store.co.neighbours(a)).tolist() for a in range(store.num_items)],
        "ui": [np.concatenate(store.ui.neighbours(u)).tolist() for u in range(store.num_users)],
        "orders": [a.tolist() for a in log.arrays().values()] + [len(log)],
        "placed": [a.tolist() for a in store.placed_orders()],
        "stats": store.stats,
        "last_ts": store.last_ts,
        "decay_ref": store.clock.ref,
        "version": store.version,
    }


def test_round_trip_equals_original(retail_replay, tmp_path: Path) -> None:
    store, _ = retail_replay
    started = time.perf_counter()
    snap_id = save(store, tmp_path / "g")
    saved = time.perf_counter()
    loaded = load(tmp_path / "g")
    assert time.perf_counter() - saved < 1 and saved - started < 5
    assert _state(loaded) == _state(store)
    assert snapshot_id(tmp_path / "g") == snap_id and len(snap_id) == 16
    # same content, same id
    assert save(loaded, tmp_path / "again") == snap_id


def test_edges_load_memory_mapped_and_change_without_touching_the_file(retail_replay, tmp_path: Path) -> None:
    store, _ = retail_replay
    save(store, tmp_path / "g")
    loaded = load(tmp_path / "g")
    block = loaded.co.blocks[0]
    assert isinstance(block.index, np.memmap) and not block.index.flags.writeable
    before = loaded.co_purchase("22629", "22630").count
    loaded.apply(Order(order_id="new", items=[OrderLine(item_id="22629"), OrderLine(item_id="22630")],
                       ts=retail_events()[-1].ts))
    loaded.co.compact()  # the merge writes new arrays, never into the map
    assert loaded.co_purchase("22629", "22630").count == before + 1
    assert load(tmp_path / "g").co_purchase("22629", "22630").count == before


def test_a_new_snapshot_replaces_the_old_one_atomically(retail_replay, tmp_path: Path) -> None:
    store, _ = retail_replay
    first = save(store, tmp_path / "g")
    small = GraphStore(GraphConfig())
    small.apply_all(retail_events()[:200])
    second = save(small, tmp_path / "g")
    assert [p.name.startswith("snap-") for p in (tmp_path / "g").iterdir() if p.name != "CURRENT"] == [True]
    assert load(tmp_path / "g").num_items == small.num_items and first != second
    # a crash after the new directory was written but before CURRENT moved leaves the old one current
    (tmp_path / "g" / "snap-999999999999999999999").mkdir()
    assert snapshot_id(tmp_path / "g") == second


def test_loaded_store_keeps_idempotency(retail_replay, tmp_path: Path) -> None:
    store, _ = retail_replay
    save(store, tmp_path / "g")
    loaded = load(tmp_path / "g")
    changed = loaded.apply_all(e for e in retail_events(RETAIL_II) if e.type == "order" and e.status == "placed")
    assert changed == 0 and loaded.num_co_edges() == store.num_co_edges()


def test_a_snapshot_without_orders_takes_orders_after_loading(tmp_path: Path) -> None:
    """A worker's first checkpoint may hold only the catalog: orders applied after loading it land as in a store
    that was never saved (a record column once came back one row long and the second order failed)."""
    events = [e for e in retail_events(RETAIL_II)[:3000]]
    catalog, orders = [e for e in events if e.type == "item_upserted"], [e for e in events if e.type == "order"]
    store = GraphStore(GraphConfig())
    store.apply_all(catalog)
    save(store, tmp_path / "g")
    loaded = load(tmp_path / "g")
    loaded.apply_all(orders)
    store.apply_all(orders)
    assert len(orders) > 10 and _state(loaded) == _state(store)


def test_a_reader_racing_a_writer_reads_the_newer_snapshot(retail_replay, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker writes checkpoints while others read them: the directory CURRENT named may be gone by the time
    its files are read, and the reader then reads the one that replaced it."""
    import graph.snapshot as snapshot

    store, _ = retail_replay
    save(store, tmp_path / "g", {"n": 1})
    gone = snapshot._current(tmp_path / "g")
    save(store, tmp_path / "g", {"n": 2})  # removes the first
    current, calls = snapshot._current, []
    monkeypatch.setattr(snapshot, "_current", lambda path: gone if not calls.append(1) and len(calls) == 1
                        else current(path))
    loaded, extra = snapshot.load_with_extra(tmp_path / "g")
    assert not gone.exists() and extra == {"n": 2} and loaded.num_co_edges() == store.num_co_edges()


def test_a_reader_racing_a_removal_in_progress_reads_the_newer_snapshot(retail_replay, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The replaced directory still exists but some of its files are already gone (``rmtree`` removes files
    first): the reader reads the newer snapshot, not an error."""
    import graph.snapshot as snapshot

    store, _ = retail_replay
    save(store, tmp_path / "g", {"n": 1})
    old = snapshot._current(tmp_path / "g")
    kept = tmp_path / "kept"
    shutil.copytree(old, kept)
    save(store, tmp_path / "g", {"n": 2})
    shutil.copytree(kept, old)  # the old directory back ...
    (old / "ui_indptr.npy").unlink()  # ... half removed
    current, calls = snapshot._current, []
    monkeypatch.setattr(snapshot, "_current", lambda path: old if not calls.append(1) and len(calls) == 1
                        else current(path))
    loaded, extra = snapshot.load_with_extra(tmp_path / "g")
    assert old.is_dir() and extra == {"n": 2} and loaded.num_co_edges() == store.num_co_edges()
    with pytest.raises(snapshot.SnapshotError, match="unreadable"):  # the current one itself broken: an error
        (snapshot._current(tmp_path / "g") / "ui_indptr.npy").unlink()
        snapshot.load_with_extra(tmp_path / "g")


def _format_2(store: GraphStore, path: Path, version: int = 2) -> None:
    """What bundlegnn wrote before snapshots were directories: one .npz of edge lists, every order kept."""
    ids = store.items.ids
    a, b, count, weight = store.co.edges()
    u, i, ucount, uweight = store.ui.edges()
    ts, users, indptr, items = store.placed_orders()
    order_ids = [f"o{k}" for k in range(len(ts))]
    ref = store.clock.ref
    n = store.num_items
    strings = {"format": "bundlegnn-graph", "format_version": version, "config": {"half_life_days": 60.0},
               "stats": {"events": 1}, "last_ts": store.last_ts, "version": store.version, "item_ids": ids,
               "user_ids": store.users.ids, "titles": [it.title for it in store.catalog],
               "descriptions": [it.description for it in store.catalog], "categories": [None] * n,
               "order_ids": order_ids, "order_status": ["placed"] * len(ts)}
    if version == 2:
        strings["decay_ref"] = ref
    arrays = {"strings": np.frombuffer(json.dumps(strings).encode(), np.uint8), "item_price": np.full(n, np.nan),
              "item_in_stock": np.ones(n, bool), "item_has_text": np.ones(n, bool), "item_updated": np.zeros(n),
              "order_ts": ts, "order_user": users, "order_ptr": indptr, "order_items": items}
    last = store.last_ts
    for prefix, cols in (("co_", (a, b, count, weight)), ("ui_", (u, i, ucount, uweight)),
                         ("io_", (np.arange(n), np.arange(n), store.item_order_counts(),
                                  store.item_orders.weight[:n]))):
        w = cols[3] * (np.exp2((ref - last) / store.half_life) if version == 1 else 1.0)  # v1: at the newest time
        arrays.update({prefix + "src": cols[0], prefix + "dst": cols[1], prefix + "count": cols[2],
                       prefix + "weight": w, prefix + "ts": np.full(len(cols[0]), last)})
    np.savez(path, **arrays)


@pytest.mark.parametrize("version", [1, 2])
def test_older_snapshot_files_still_load_with_the_same_edges(retail_replay, tmp_path: Path, version: int) -> None:
    store, _ = retail_replay
    _format_2(store, tmp_path / "old.npz", version)
    old = load(tmp_path / "old.npz")
    now = store.last_ts
    assert old.co_edges(now)[2].tolist() == store.co_edges(now)[2].tolist()  # counts
    assert np.allclose(old.co_edges(now)[3], store.co_edges(now)[3], rtol=1e-6)
    assert np.allclose(old.ui_edges(now)[3], store.ui_edges(now)[3], rtol=1e-6)
    assert len(old.orders) == len(store.placed_orders()[0])  # every order is inside the 90-day window of the newest
    later = now + 30 * 86400.0
    assert np.allclose(old.co_edges(later)[3], store.co_edges(later)[3], rtol=1e-6)


def test_foreign_or_future_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SnapshotError, match="not a graph snapshot"):
        load(bad)
    with pytest.raises(SnapshotError, match="not a graph snapshot"):
        load(tmp_path / "missing")
    future = tmp_path / "future.npz"
    np.savez(future, strings=np.frombuffer(b'{"format": "bundlegnn-graph", "format_version": 99}', np.uint8))
    with pytest.raises(SnapshotError, match="v99, this version reads 'bundlegnn-graph' v1 to v3"):
        load(future)
    (tmp_path / "dir" / "snap-1").mkdir(parents=True)
    (tmp_path / "dir" / "CURRENT").write_text("snap-1")
    (tmp_path / "dir" / "snap-1" / "meta.json").write_text('{"format": "bundlegnn-graph", "format_version": 4}')
    with pytest.raises(SnapshotError, match="v4, this version reads"):
        load(tmp_path / "dir")
