"""`make bench`, API part: lookup latency p50/p99 and requests/s from a second process on loopback.

The server is the real API (uvicorn, one process) over a view holding what
the stream worker would publish for the real data: every item's complement
list from :class:`training.complements.ComplementScorer` (co-purchase
statistics) and the catalog. The load client is a small asyncio HTTP/1.1
client with keep-alive connections in this process.

Traffic follows the data: anchors are drawn in proportion to how many orders
hold them (popular product pages are asked for more often), carts are 2–3
items of a real order. Each scenario runs open-loop at a fixed rate (requests
leave on a schedule whatever the server does, so a slow server cannot lower
the offered load; ``client_lag_p99_ms`` says how late the client itself sent)
and closed-loop for the ceiling. Latency runs from writing a request to
reading its whole response. The ``uncached`` scenarios disable the response
cache, so every request builds its bundles.

The last scenario asks for item bundles at the same rate while people
search a 212,200-item catalog (``GET /items?q=``, the bundle explorer's
search, 5 a second): Online Retail II full's titles under 40 renamed copies
added to the view, as a shop of 200k items would have.

Writes ``bench/results/api.json`` and ``api.md``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing as mp
import random
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "online_retail_ii" / "online_retail_ii.csv.gz"
FULL = ROOT.parent / "shared" / "data" / "online_retail_ii_full" / "online_retail_ii.csv.gz"
RATE = 2000  # requests/s of the open-loop runs (the target: p99 < 5 ms at >= 2,000 req/s)
SECONDS = 10
COPIES = 40  # of Online Retail II full's catalog in the search scenario (212,200 items)
SEARCHES = 5.0  # searches a second beside the lookups
QUERIES = ["lunch bag", "heart", "red retrospot cake", "wooden", "christmas", "zinc", "tea", "mug"]


def catalog_titles() -> dict[str, str]:
    """Online Retail II full's item ids and their first description."""
    import csv
    import gzip

    titles: dict[str, str] = {}
    with gzip.open(FULL, "rt", encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            titles.setdefault(row[1], row[2] or row[1])
    return titles


def load_view(cache_size: int, copies: int = 0):  # noqa: ANN201
    from graph.events import ItemUpserted
    from graph.store import GraphConfig, GraphStore
    from serving.api import create_app
    from serving.view import BundleView
    from training.complements import ComplementScorer
    from training.datasets import in_time_order, read_events

    store, view = GraphStore(GraphConfig()), BundleView()
    for event in in_time_order(read_events(DATA)):
        store.apply(event)
        if isinstance(event, ItemUpserted):
            view.upsert_item(event)
    scorer = ComplementScorer(store)
    for item_id in store.items.ids:
        view.apply_update(scorer.update(item_id))
    if copies:
        from serving.view import ItemInfo

        titles = catalog_titles()
        for k in range(copies):
            for item_id, title in titles.items():
                view.set_item(ItemInfo(f"{item_id}-{k}", f"{title} {k}"))
    view.titles.catch_up()  # as `bundlegnn serve` does once its view has caught up
    gc.collect()
    gc.freeze()  # what `bundlegnn serve` does once its view has caught up
    return create_app(view, cache_size=cache_size)


def serve(port: int, cache_size: int, copies: int = 0) -> None:
    import uvicorn

    from serving.settings import ServingConfig

    sys.setswitchinterval(ServingConfig().switch_interval)  # as `bundlegnn serve` does

    uvicorn.run(load_view(cache_size, copies), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")


def requests() -> tuple[list[bytes], list[bytes]]:
    """Item-bundle GETs weighted by order counts, and cart-completion POSTs from real orders."""
    from graph.events import Order
    from training.datasets import in_time_order, read_events

    orders = [e for e in in_time_order(read_events(DATA)) if isinstance(e, Order) and len(e.item_ids) >= 2]
    counts: dict[str, int] = {}
    for o in orders:
        for i in o.item_ids:
            counts[i] = counts.get(i, 0) + 1
    rng = random.Random(0)
    ids, weights = list(counts), list(counts.values())
    gets = [f"GET /items/{i}/bundles?k=3&size=3 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            for i in rng.choices(ids, weights, k=5000)]
    posts = []
    for o in rng.choices(orders, k=5000):
        body = json.dumps({"items": rng.sample(o.item_ids, min(len(o.item_ids), rng.choice([2, 3]))), "k": 3,
                           "size": 2}).encode()
        posts.append(b"POST /bundles/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return gets, posts


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return status


async def load(port: int, reqs: list[bytes], rate: float | None, seconds: float, connections: int = 16) -> dict:
    """Open loop at ``rate`` req/s, or closed loop (``rate=None``), over ``connections`` keep-alive sockets.

    Each connection is one coroutine that takes the next slot of the shared
    schedule, waits for its time, sends and reads; a connection busy with a
    slow response makes the next slot late, which ``lags`` records.
    """
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    slot = 0
    started = time.perf_counter()
    end = started + seconds

    async def connection() -> None:
        nonlocal errors, slot
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                n, slot = slot, slot + 1
                due = started + n / rate if rate else time.perf_counter()
                if due >= end:
                    return
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                sent = time.perf_counter()
                lags.append(sent - due)
                if await _exchange(reader, writer, reqs[n % len(reqs)]) != 200:
                    errors += 1
                latencies.append(time.perf_counter() - sent)
        finally:
            writer.close()

    gc.disable()  # the client's own pauses would count as server latency
    try:
        await asyncio.gather(*(connection() for _ in range(connections)))
    finally:
        gc.enable()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3),
            "client_lag_p99_ms": round(float(np.percentile(np.array(lags) * 1000, 99)), 3)}


async def searches(port: int, rate: float, seconds: float) -> dict:
    """``GET /items?q=`` at ``rate`` a second on one connection (a person typing in the explorer)."""
    from urllib.parse import quote

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies, errors, n = [], 0, 0
    started = time.perf_counter()
    try:
        while (due := started + n / rate) < started + seconds:
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            sent = time.perf_counter()
            request = f"GET /items?q={quote(QUERIES[n % len(QUERIES)])} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            errors += await _exchange(reader, writer, request) != 200
            latencies.append(time.perf_counter() - sent)
            n += 1
    finally:
        writer.close()
    ms = np.array(latencies) * 1000
    return {"searches": len(ms), "errors": errors, "search_p50_ms": round(float(np.percentile(ms, 50)), 3),
            "search_max_ms": round(float(ms.max()), 3)}


async def lookups_while_searching(port: int, reqs: list[bytes]) -> dict:
    looked, searched = await asyncio.gather(load(port, reqs, RATE, SECONDS), searches(port, SEARCHES, SECONDS))
    return {**looked, **searched}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("API did not start")


def main() -> None:
    import uvloop

    gets, posts = requests()
    results: dict[str, dict] = {}
    for cache_size in (100_000, 0):
        port = free_port()
        server = mp.get_context("spawn").Process(target=serve, args=(port, cache_size), daemon=True)
        server.start()
        try:
            wait_up(port)
            kind = "cached" if cache_size else "uncached"
            for name, reqs in (("item bundles", gets), ("cart completion", posts)):
                uvloop.run(load(port, reqs, None, 3))  # warm-up: fill the cache,
                uvloop.run(load(port, reqs, RATE, 5))  # then settle at the measured rate
                results[f"{name}, {kind}, {RATE}/s"] = uvloop.run(load(port, reqs, RATE, SECONDS))
                results[f"{name}, {kind}, max"] = uvloop.run(load(port, reqs, None, SECONDS))
                print(name, kind, results[f"{name}, {kind}, {RATE}/s"], results[f"{name}, {kind}, max"], flush=True)
        finally:
            server.terminate()
            server.join()
    port = free_port()
    server = mp.get_context("spawn").Process(target=serve, args=(port, 100_000, COPIES), daemon=True)
    server.start()
    try:
        wait_up(port)
        name = f"item bundles, cached, {RATE}/s, {SEARCHES:g} searches/s over {COPIES} copies of the full catalog"
        uvloop.run(load(port, gets, None, 3))
        uvloop.run(load(port, gets, RATE, 5))
        results[f"item bundles, cached, {RATE}/s, same server, no searches"] = uvloop.run(load(port, gets, RATE, SECONDS))
        results[name] = uvloop.run(lookups_while_searching(port, gets))
        search_catalog = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())["items"]
        print(name, results[name], flush=True)
    finally:
        server.terminate()
        server.join()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    from bundlegnn.provenance import describe, machine

    ran = machine()
    (out / "api.json").write_text(json.dumps({"machine": ran, "rate": RATE, "seconds": SECONDS, "results": results,
                                              "search_catalog": search_catalog}, indent=2))
    lines = ["| scenario | req/s | p50 ms | p99 ms | max ms | client lag p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['client_lag_p99_ms']} "
              f"| {r['errors']} |" for k, r in results.items()]
    searched = [(k, r) for k, r in results.items() if "searches" in r]
    lines += ["", "Searches in the last scenario (`GET /items?q=`, queries " + ", ".join(f"'{q}'" for q in QUERIES)
              + "):", "", "| scenario | searches | p50 ms | max ms | errors |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['searches']} | {r['search_p50_ms']} | {r['search_max_ms']} | {r['errors']} |"
              for k, r in searched]
    head = (f"# HTTP API under load\n\n{describe(ran)}. `python bench/api.py` (server and load generator share the "
            f"cores).\n\n")
    (out / "api.md").write_text(head + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
