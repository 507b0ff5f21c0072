"""Snapshots: a saved and loaded store equals the original, and bad files fail clearly."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from graph.snapshot import SnapshotError, load, save
from graph.store import GraphStore


def _state(store: GraphStore) -> dict:
    return {
        "config": store.config.model_dump(),
        "items": store.items.ids,
        "users": store.users.ids,
        "catalog": store.catalog,
        "item_orders": [store.item_orders.get(i) for i in range(store.num_items)],
        "co": [{b: store.co.get(a, b) for b in store.co.slots_of(a)} for a in range(store.co.rows)],
        "ui": [{i: store.ui.get(u, i) for i in store.ui.slots_of(u)} for u in range(store.ui.rows)],
        "orders": store.orders,
        "stats": store.stats,
        "last_ts": store.last_ts,
        "decay_ref": store.clock.ref,
        "version": store.version,
    }


def test_round_trip_equals_original(retail_replay, tmp_path: Path) -> None:
    store, _ = retail_replay
    path = tmp_path / "g.npz"
    started = time.perf_counter()
    snap_id = save(store, path)
    loaded = load(path)
    elapsed = time.perf_counter() - started
    assert _state(loaded) == _state(store)
    assert elapsed < 10, f"snapshot round trip took {elapsed:.1f}s"
    # a co-purchase edge is one tally reached from both ends after loading, as before
    a, b = next((a, b) for a in range(loaded.co.rows) for b in loaded.co.slots_of(a))
    assert loaded.co.slots_of(a)[b] == loaded.co.slots_of(b)[a]
    # same content, same id
    assert save(loaded, tmp_path / "again.npz") == snap_id and len(snap_id) == 16


def test_version_1_snapshots_still_load_with_the_same_weights(retail_replay, tmp_path: Path) -> None:
    """v1 kept each weight as seen at its tally's newest time; loading converts it to the reference time."""
    import json

    store, _ = retail_replay
    save(store, tmp_path / "g.npz")
    z = dict(np.load(tmp_path / "g.npz"))
    strings = json.loads(z["strings"].tobytes())
    ref, hl = strings.pop("decay_ref"), store.half_life
    for prefix in ("co_", "ui_", "io_"):  # what version 1 wrote
        z[prefix + "weight"] = z[prefix + "weight"] * np.exp2((ref - z[prefix + "ts"]) / hl)
    strings["format_version"] = 1
    z["strings"] = np.frombuffer(json.dumps(strings).encode(), np.uint8)
    np.savez(tmp_path / "v1.npz", **z)
    old = load(tmp_path / "v1.npz")
    now = store.last_ts
    assert old.co_edges(now)[2].tolist() == store.co_edges(now)[2].tolist()  # counts
    assert np.allclose(old.co_edges(now)[3], store.co_edges(now)[3], rtol=1e-9)
    assert np.allclose(old.ui_edges(now)[3], store.ui_edges(now)[3], rtol=1e-9)
    later = now + 30 * 86400.0
    assert np.allclose(old.co_edges(later)[3], store.co_edges(later)[3], rtol=1e-9)


def test_loaded_store_keeps_idempotency(retail_replay, tmp_path: Path) -> None:
    from training.datasets import online_retail_events
    from tests.conftest import RETAIL_II

    store, _ = retail_replay
    save(store, tmp_path / "g.npz")
    loaded = load(tmp_path / "g.npz")
    changed = loaded.apply_all(e for e in online_retail_events(RETAIL_II) if e.type == "order")
    assert changed == 0 and loaded.num_co_edges() == store.num_co_edges()


def test_foreign_or_future_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SnapshotError, match="not a graph snapshot"):
        load(bad)
    future = tmp_path / "future.npz"
    np.savez(future, strings=np.frombuffer(b'{"format": "bundlegnn-graph", "format_version": 99}', np.uint8))
    with pytest.raises(SnapshotError, match="v99, this version reads"):
        load(future)
