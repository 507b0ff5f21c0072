"""End to end on the real broker: replay real orders → Faust worker → bundle-updates → HTTP API."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from graph.store import GraphConfig, GraphStore
from tests.conftest import DATA, retail_events
from tests.kafka_helpers import CliProcess, WorkerProcess, replay, stream_env

pytestmark = pytest.mark.broker
SAMPLE = DATA / "online_retail_ii_sample.csv.gz"


def most_co_purchased() -> tuple[str, str, int]:
    """An anchor from the sample (the item in most orders) and its clearly most co-purchased partner."""
    store = GraphStore(GraphConfig())
    store.apply_all(retail_events(SAMPLE))
    counts = store.item_order_counts()
    for row in sorted(range(store.num_items), key=lambda r: (-counts[r], store.items.ids[r])):
        rows, counts, _ = store.co_neighbours(row)
        pairs = sorted(zip(counts.tolist(), (store.items.ids[b] for b in rows.tolist())), reverse=True)
        if len(pairs) > 1 and pairs[0][0] > pairs[1][0]:
            return store.items.ids[row], pairs[0][1], pairs[0][0]
    raise AssertionError("no anchor with a unique top partner in the sample")


def test_replayed_orders_reach_the_api_as_bundles(broker: str, tmp_path: Path) -> None:
    anchor, partner, together = most_co_purchased()
    env = stream_env(broker, tmp_path / "state")
    env["BUNDLEGNN_STREAM__ENCODE_TEXT"] = "false"
    worker = WorkerProcess(env, tmp_path / "worker.log", "--model", "none").start()
    api = CliProcess(env, tmp_path / "api.log", "serve", "--model", "none", "--port", "0", ready="bundle API on")
    try:
        assert replay(env, SAMPLE) > 200
        api.start()
        url = (tmp_path / "state" / "api.addr").read_text()
        with httpx.Client(base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 90
            while True:  # the worker is done with the sample once the anchor's counts match the data
                r = http.get(f"/items/{anchor}/complements", params={"k": 50})
                counts = {c["item_id"]: c["orders"] for c in r.json().get("complements", [])} if r.is_success else {}
                health = http.get("/healthz").json()["status"]
                if (counts.get(partner) == together and health == "ok") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert counts.get(partner) == together, (r.status_code, r.text[:500])
            assert health == "ok"

            body = http.get(f"/items/{anchor}/bundles", params={"k": 3, "size": 3}).json()
            assert body["anchor"]["item_id"] == anchor and body["anchor"]["title"] != anchor  # catalog was read
            bundles = [[m["item_id"] for m in b["items"]] for b in body["bundles"]]
            assert len(bundles) == 3 and all(len(b) == 3 and b[0] == anchor for b in bundles), bundles
            assert any(partner in b for b in bundles), (partner, bundles)
            why = " ".join(w for b in body["bundles"] for w in b["why"])
            assert f"in {together} orders" in why

            cart = http.post("/bundles/complete", json={"items": [anchor], "k": 3, "size": 2}).json()
            assert any(partner in [m["item_id"] for m in b["items"]] for b in cart["bundles"])
            assert http.get("/items/NOT-AN-ITEM/bundles").status_code == 404
            metrics = http.get("/metrics").text
            assert "bundlegnn_bundle_update_age_seconds_count" in metrics
    finally:
        api.stop() if api.process else None
        worker.stop()
