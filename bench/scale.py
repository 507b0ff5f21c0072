"""`make bench` (scale): the data path — import, graph store, snapshot, refresh, API view — as the shop grows.

Shops are scale-ups of Online Retail II full (``../shared/data/online_retail_ii_full``): K copies of its
catalog and its orders (copy ``k`` of item ``X`` is ``X~k``, of invoice ``I`` is ``I~k``, same times,
same basket statistics), written as a CSV in the original layout and imported through the same mapping,
plus the real Complete Journey (92k-product catalogue, 1.47 M lines). Per shop:

* ``bundlegnn build-graph`` as a subprocess: seconds, order lines/s and peak RSS (``/usr/bin/time -v``);
* bytes per co-purchase pair (both directions, count and weight) and the snapshot's size and load time;
* refresh: ms per item for :meth:`~training.complements.ComplementScorer.update_json` (the worker's
  refresh) on a sample of items, with text embeddings in the approximate index, after one untimed pass
  (the snapshot is memory-mapped: a worker's graph is in memory). Copies' texts are their original's
  embedding plus a little noise per copy (distinct vectors, no 200k encodes); Complete Journey uses its
  real texts;
* the API view's memory per item, with every item's catalog entry and a 20-complement list.

Writes ``bench/results/scale.{json,md}`` with each metric's growth exponent fitted over the scales
(``d log metric / d log items``: 1 is linear, 0 flat). Usage: ``python bench/scale.py [--scales 1,4,10,40]
[--no-cj]``; the 40× shop needs about 4 GB of disk while it runs.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundlegnn.provenance import machine  # noqa: E402  (the other benches import it from here)

SHARED = ROOT.parent / "shared" / "data"
ORII = SHARED / "online_retail_ii_full" / "online_retail_ii.csv.gz"
CJ_CONFIG = ROOT / "configs" / "completejourney.yaml"
WORK = ROOT / "var" / "bench-scale"
OUT = ROOT / "bench" / "results"
SEP = "~"
FEES = None  # the mapping's fee codes, read once


def _fee_codes() -> set[str]:
    import yaml

    global FEES
    if FEES is None:
        FEES = set(yaml.safe_load((ROOT / "configs/mappings/online_retail_ii.yaml").read_text())["skip_if"]["StockCode"])
    return FEES


def _runs() -> tuple[list[str], list[list[list[str]]]]:
    """Online Retail II full's header and its invoices (runs of consecutive rows), in file order."""
    with gzip.open(ORII, "rt", newline="") as src:
        reader = csv.reader(src)
        header, runs = next(reader), []
        for row in reader:
            if runs and row[0] == runs[-1][0][0]:
                runs[-1].append(row)
            else:
                runs.append([row])
    return header, runs


def write_copies(k: int, out: Path, in_time_order: bool = False) -> dict:
    """K copies of every invoice (a run of consecutive rows), one after the other, in the file's order (or
    sorted by invoice time: the file's two workbook sheets overlap by 8 days)."""
    fees = _fee_codes()
    header, runs = _runs()
    if in_time_order:
        runs.sort(key=lambda run: run[0][4])  # ISO times sort as text; stable for equal times
    rows = 0
    with open(out, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(header)
        for run in runs:
            for c in range(k):
                for r in run:
                    code = r[1] if r[1].strip() in fees else f"{r[1]}{SEP}{c}"
                    customer = f"{r[6].removesuffix('.0')}{SEP}{c}" if r[6].strip() else ""
                    writer.writerow([f"{r[0]}{SEP}{c}", code, r[2], r[3], r[4], r[5], customer, r[7]])
            rows += k * len(run)
    return {"rows": rows, "bytes": out.stat().st_size}


def _time_v(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under ``/usr/bin/time -v``: the result, wall seconds and peak RSS in GB."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done, wall, int(found.group(1)) / 1e6


def build(data_args: list[str], snapshot: Path, env: dict[str, str]) -> dict:
    """``bundlegnn build-graph`` on a shop: its summary, wall seconds and peak RSS."""
    cmd = [sys.executable, "-m", "bundlegnn.cli", "build-graph", *data_args, "--out", str(snapshot),
           "--dead-letters", str(snapshot.parent / "dead.jsonl")]
    done, wall, rss = _time_v(cmd, env)
    summary = json.loads(done.stdout)
    graph, dataset = summary["graph"], summary["dataset"]
    pairs = graph["co_purchase_edges"]
    return {
        "items": graph["items"], "users": graph["users"], "orders": dataset["order_events"] + dataset["cancel_events"],
        "order_lines": dataset["rows"], "co_purchase_pairs": pairs,
        "build_graph_s": round(wall, 1), "import_s": summary["import_seconds"], "save_s": summary["save_seconds"],
        "lines_per_s": round(dataset["rows"] / summary["import_seconds"]),
        "orders_per_s": round((dataset["order_events"] + dataset["cancel_events"]) / summary["import_seconds"]),
        "peak_rss_gb": round(rss, 2),
        "bytes_per_pair": round(graph["co_purchase_bytes"] / max(pairs, 1), 2),
        "store_array_bytes_per_pair": round(graph["store_array_bytes"] / max(pairs, 1), 2),
        "outside_window": graph["outside_window"],
    }


def snapshot_stats(snapshot: Path, env: dict[str, str]) -> dict:
    size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    code = ("import time,sys; from graph.snapshot import load; t=time.perf_counter(); s=load(sys.argv[1]); "
            "n=s.num_co_edges(); print(time.perf_counter()-t)")
    done, _, rss = _time_v([sys.executable, "-c", code, str(snapshot)], env)
    return {"snapshot_gb": round(size / 1e9, 2), "snapshot_load_s": round(float(done.stdout.split()[-1]), 2),
            "snapshot_load_rss_gb": round(rss, 2)}


# ---- in a subprocess: refresh and API memory ------------------------------------------------------------
def _texts(store, copies: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows and unit text vectors of the store's described items (copies: original's vector plus noise)."""
    from training.complements import unit
    from training.encoder import TextEncoder

    encoder = TextEncoder(cache_dir=WORK / "cache" / "text")  # the cache a worker with state_dir WORK uses
    rows = store.text_rows()
    if not copies:
        return rows, encoder.encode([store.catalog[r].text for r in rows], progress=False)
    ids = store.items.ids
    base_of, copy_of = {}, np.zeros(len(rows), np.int64)
    for n, r in enumerate(rows.tolist()):
        code, _, c = ids[r].rpartition(SEP)
        base_of.setdefault(code, store.catalog[r].text)
        copy_of[n] = int(c)
    codes = list(base_of)
    base = encoder.encode([base_of[c] for c in codes], progress=False)
    at = {c: i for i, c in enumerate(codes)}
    index = np.array([at[ids[r].rpartition(SEP)[0]] for r in rows.tolist()])
    noise = np.zeros((len(rows), base.shape[1]), np.float32)
    for c in np.unique(copy_of):
        pick = copy_of == c
        noise[pick] = np.random.default_rng([int(c), 7]).normal(size=(len(codes), base.shape[1]))[index[pick]]
    return rows, unit(base[index] + 0.03 * noise).astype(np.float32)


def refresh_main(snapshot: str, copies: bool, sample: int) -> None:
    from graph.snapshot import load
    from training.complements import ComplementScorer

    store = load(snapshot)
    scorer = ComplementScorer(store)
    rows, vectors = _texts(store, copies)
    started = time.perf_counter()
    scorer.set_text(rows, vectors)
    indexed = time.perf_counter() - started
    rng = np.random.default_rng(0)
    ordered = np.flatnonzero(store.item_order_counts() > 0)
    unsold = np.setdiff1d(rows, ordered)
    picks = rng.choice(ordered, min(sample, len(ordered)), replace=False).tolist()
    picks += rng.choice(unsold, min(sample // 10, len(unsold)), replace=False).tolist() if len(unsold) else []
    ids = store.items.ids
    for r in picks:  # a worker's graph is in memory: page the memory-mapped snapshot in first
        scorer.update_json(ids[r])
    scorer._text_neighbours.clear()  # and let every refresh search the text index again
    times = []
    for r in picks:
        t = time.perf_counter()
        scorer.update_json(ids[r])
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    print(json.dumps({"refresh_ms_mean": round(float(ms.mean()), 3), "refresh_ms_p99": round(float(np.percentile(ms, 99)), 3),
                      "refreshed_items": len(picks), "text_index_build_s": round(indexed, 1)}))


def api_main(snapshot: str, copies: bool) -> None:
    """The API view with every item's catalog entry and a 20-complement list: RSS added per item."""
    import resource

    from graph.snapshot import load
    from serving.view import BundleView
    from training.complements import BundleUpdate, Complement

    store = load(snapshot)
    ids, catalog = store.items.ids, store.catalog
    rng = np.random.default_rng(0)
    n = len(ids)
    lists = rng.integers(0, n, size=(n, 20))  # the view does not care which items a list names
    del store
    import gc

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from graph.events import ItemUpserted
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    view = BundleView()
    for r, (item_id, item) in enumerate(zip(ids, catalog)):
        view.upsert_item(ItemUpserted(item_id=item_id, title=item.title or item_id, price=item.price, ts=now))
        comps = [Complement(item_id=ids[b], score=1.0 / (k + 1), orders=k, source="co-purchase")
                 for k, b in enumerate(lists[r].tolist())]
        view.apply_update(BundleUpdate(item_id=item_id, complements=comps, model_version=None, graph_version=1,
                                       updated_at=now), 0.0)
    del lists, catalog
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"api_kb_per_item": round((after - before) / n, 2), "api_items": n}))


def _sub(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---- the run ---------------------------------------------------------------------------------------------
def shop(name: str, data_args: list[str], copies: bool, env: dict[str, str], sample: int) -> dict:
    snapshot = WORK / name / "graph"
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    row = {"shop": name, **build(data_args, snapshot, env)}
    print(f"  {name}: built {row}", flush=True)
    row.update(snapshot_stats(snapshot, env))
    row.update(_sub(["refresh", str(snapshot), "copies" if copies else "real", str(sample)], env))
    row.update(_sub(["api", str(snapshot), "copies" if copies else "real"], env))
    print(f"  {name}: {row}", flush=True)
    return row


def worker_replay(config: Path, reference: Path, env: dict[str, str]) -> dict:
    """The shop replayed through Kafka and one worker (embedded broker): replay and drain seconds, and whether
    the worker's graph equals ``reference`` (the build-graph snapshot) pair by pair."""
    sys.path.insert(0, str(ROOT))
    from graph.snapshot import load
    from streaming.broker import EmbeddedBroker, free_port
    from tests.kafka_helpers import WorkerProcess, scrape, stream_env

    state = WORK / "cj-worker"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    snapshot = state / "graph"
    port = free_port()
    with EmbeddedBroker(log_path=state / "broker.log") as broker:
        wenv = {**stream_env(broker.bootstrap, WORK), "BUNDLEGNN_STREAM__PARTITIONS": "4",
                "BUNDLEGNN_STREAM__METRICS_PORT": str(port)}
        wenv.pop("BUNDLEGNN_GRAPH__ORDER_WINDOW_DAYS")  # the shop's own config decides
        worker = WorkerProcess(wenv, state / "worker.log", "--config", str(config), "--model", "none",
                               "--snapshot", str(snapshot)).start(timeout=600)
        try:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "bundlegnn.cli", "replay", "--config", str(config),
                                   "--dead-letters", str(state / "replay-dead.jsonl")], cwd=ROOT, env=wenv,
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"replay failed:\n{done.stderr[-3000:]}")
            replayed = time.perf_counter() - started
            sent = json.loads(done.stdout.splitlines()[-1])["sent"]
            applied, published, since = 0.0, -1.0, time.perf_counter()
            while time.perf_counter() - since < 10 or applied < sent:  # every event taken, then 10 s quiet
                if time.perf_counter() - started > 3600:
                    raise RuntimeError(f"the worker took {applied:.0f} of {sent} events in an hour")
                time.sleep(1.0)
                samples = scrape(port)
                applied = sum(v for (name, _), v in samples.items()  # applied or dead-lettered
                              if name in ("bundlegnn_worker_events_total", "bundlegnn_worker_dead_letters_total"))
                now = samples.get(("bundlegnn_worker_bundle_updates_total", ()), 0.0)
                if now != published or applied < sent:
                    published, since = now, time.perf_counter()
            drained = time.perf_counter() - started - 10
        finally:
            code = worker.stop(timeout=300)
    if code != 0:
        raise RuntimeError(f"the worker exited with {code}: {worker.output()[-3000:]}")
    got, want = load(snapshot), load(reference)

    def pairs(store) -> dict:
        a, b, count, _ = store.co_edges()
        ids = store.items.ids
        return {(ids[x], ids[y]) if ids[x] < ids[y] else (ids[y], ids[x]): c
                for x, y, c in zip(a.tolist(), b.tolist(), count.tolist())}

    same = pairs(got) == pairs(want)
    return {"worker_replay_s": round(replayed, 1), "worker_drain_s": round(drained, 1),
            "worker_bundle_updates": int(published), "worker_items": got.num_items,
            "worker_co_purchase_pairs": got.num_co_edges(), "worker_equals_build_graph": same}


def growth(rows: list[dict], metric: str) -> float | None:
    """The slope of log(metric) over log(items), least squares over the scale-ups."""
    pts = [(r["items"], r[metric]) for r in rows if r["shop"].startswith("orii") and r.get(metric)]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


COLUMNS = ["shop", "items", "orders", "order_lines", "co_purchase_pairs", "build_graph_s", "lines_per_s",
           "peak_rss_gb", "bytes_per_pair", "snapshot_gb", "snapshot_load_s", "refresh_ms_mean", "refresh_ms_p99",
           "text_index_build_s", "api_kb_per_item"]
WORKER = ["shop", "worker_replay_s", "worker_drain_s", "worker_bundle_updates", "worker_items", "worker_co_purchase_pairs",
          "worker_equals_build_graph"]


def table(cols: list[str], rows: list[dict]) -> list[str]:
    """A markdown table's lines: one column per key, one row per dict (missing values blank)."""
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])


def markdown(report: dict) -> str:
    rows = report["shops"]
    lines = ["# Scale: import, graph store, snapshot, refresh, API view", "",
             f"{report['machine']['date']}, commit {report['machine']['commit']}, {report['machine']['cpus']} cores, "
             f"{report['machine']['ram_gb']} GB RAM, {report['machine']['cpu']}. `python bench/scale.py`.", ""]
    lines += table(COLUMNS, rows)
    through = [r for r in rows if "worker_replay_s" in r]
    if through:
        lines += ["", "Through Kafka (embedded broker) and one worker, compared pair by pair with build-graph:", ""]
        lines += table(WORKER, through)
    lines += ["", "Growth exponents over the Online Retail II scale-ups (d log metric / d log items; 1 = linear):", "",
              "| metric | exponent |", "|---|---|"]
    lines += [f"| {m} | {e} |" for m, e in report["growth"].items()]
    lines += ["", "orii_K: K copies of Online Retail II full's catalog and orders (copies' texts: the original's "
              "embedding plus noise); cj: The Complete Journey through `configs/completejourney.yaml`. "
              "peak_rss_gb: `/usr/bin/time -v` of `bundlegnn build-graph`. bytes_per_pair: co-purchase table "
              "bytes per unordered pair, both directions with count and weight. refresh: `update_json` per "
              "item (the worker's refresh), candidates from co-purchases and the text index. api_kb_per_item: "
              "the API view's RSS per item with a catalog entry and a 20-complement list.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scales", default="1,4,10,40")
    parser.add_argument("--no-cj", action="store_true")
    parser.add_argument("--sample", type=int, default=2000, help="items refreshed per shop")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BUNDLEGNN_PATHS__STATE_DIR": str(WORK)}
    rows = []
    for k in [int(s) for s in args.scales.split(",")]:
        data = WORK / f"orii_{k}.csv"
        started = time.perf_counter()
        written = write_copies(k, data)
        print(f"orii_{k}: wrote {written['rows']:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        try:
            rows.append(shop(f"orii_{k}", ["--data", str(data)], True, env, args.sample))
        finally:
            data.unlink(missing_ok=True)
            shutil.rmtree(WORK / f"orii_{k}", ignore_errors=True)
    if not args.no_cj:
        row = shop("cj", ["--config", str(CJ_CONFIG)], False, env, args.sample)
        row.update(worker_replay(CJ_CONFIG, WORK / "cj" / "graph", env))
        print(f"  cj through the worker: {row}", flush=True)
        rows.append(row)
        shutil.rmtree(WORK / "cj", ignore_errors=True)
    report = {"machine": machine(), "shops": rows,
              "growth": {m: growth(rows, m) for m in ("build_graph_s", "peak_rss_gb", "bytes_per_pair", "snapshot_gb",
                                                       "snapshot_load_s", "refresh_ms_mean", "api_kb_per_item")}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps(report, indent=2))
    (OUT / "scale.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "refresh":
        refresh_main(sys.argv[2], sys.argv[3] == "copies", int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "api":
        api_main(sys.argv[2], sys.argv[3] == "copies")
    else:
        raise SystemExit(main())
