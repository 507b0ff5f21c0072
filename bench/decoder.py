"""`make bench` (decoder): the dense EASE^R-with-side-information decoder against the neighbourhood fit.

On one time split of a shop (default: Online Retail II full), each method tunes λ and the text weight on the
validation orders (fitted on the training orders before validation) and is then fitted on all training
orders and scored on the test orders: HR@10, NDCG@10, fit seconds. The text embeddings are the GNN-free side
information (the GNN's embeddings add a second side of the same form), so this isolates the decoder. The
neighbourhood fit is also timed at several ``k_co``. Writes ``bench/results/decoder.{json,md}``; the
crossover ``decoder_dense_max_items`` comes from these times and ``bench/results/model_scale.md``.
Usage: ``python bench/decoder.py [--config configs/online_retail_ii.yaml] [--data PATH]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import OUT, machine, table  # noqa: E402

from bundlegnn.config import load_settings  # noqa: E402
from training.datasets import in_time_order, read_events  # noqa: E402
from training.models.decoder import DecoderConfig, fit_decoder, side_view  # noqa: E402
from training.protocol import rank_queries, time_split  # noqa: E402
from training.baselines import item_gram  # noqa: E402

FULL = ROOT.parent / "shared" / "data" / "online_retail_ii_full"


def fit(g, text, cfg: DecoderConfig, near: dict) -> tuple[object, float]:
    started = time.perf_counter()
    decoder = fit_decoder(g, [("text", text)], cfg, "cpu", near)
    return decoder, time.perf_counter() - started


def _timed_fit(g, text, cfg: DecoderConfig, out) -> None:
    """In a fresh process: one fit's seconds and the process's peak RSS (GB)."""
    import resource

    _, seconds = fit(g, text, cfg, {})
    out.put((round(seconds, 1), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)))


def by_size(g, text, cfg: DecoderConfig, copies: list[int]) -> list[dict]:
    """Fit seconds and peak RSS of both methods on K copies of the shop (a block-diagonal Gram, the texts
    with noise), each fit in its own process: where the dense inversion stops paying."""
    import multiprocessing

    import scipy.sparse as sp

    ctx = multiprocessing.get_context("spawn")
    rng = np.random.default_rng(0)
    rows = []
    for k in copies:
        big_g = sp.kron(sp.identity(k, format="csr"), g, format="csr")
        noisy = np.concatenate([text.numpy() + 0.05 * rng.normal(size=text.shape) for _ in range(k)])
        big_text = side_view(noisy.astype(np.float32))
        for method in ("dense", "neighbourhood"):
            out = ctx.Queue()
            child = ctx.Process(target=_timed_fit, args=(big_g, big_text, cfg.model_copy(update={"method": method}),
                                                         out))
            child.start()
            seconds, rss = out.get()
            child.join()
            rows.append({"items": big_g.shape[0], "method": method, "fit_s": seconds, "peak_rss_gb": rss})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "online_retail_ii.yaml"))
    parser.add_argument("--data", default=None, help="the shop's file (default: Online Retail II full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = load_settings(Path(args.config))
    data = Path(args.data) if args.data else next(FULL.glob("*.csv*"))
    events = in_time_order(read_events(settings.data.model_copy(update={"path": data})))
    split = time_split(events, settings.graph, seed=args.seed)
    encoder = settings.encoder.build(settings.paths.text_cache)
    texts = {name: side_view(encoder.encode([i.text for i in store.catalog]))
             for name, store in (("fit", split.fit), ("train", split.train))}
    grams = {"fit": item_gram(split.fit), "train": item_gram(split.train)}
    cfg = settings.training
    rows = []
    for method in ("dense", "neighbourhood"):
        near_fit: dict = {}
        val = {}
        seconds = []
        for lam in cfg.decoder_lambdas:
            for t in cfg.decoder_text_weights:
                d = DecoderConfig(lam=lam, text_weight=t, method=method, k_co=cfg.decoder_k_co,
                                  k_side=cfg.decoder_k_side, cold_weight=cfg.decoder_cold_weight)
                decoder, s = fit(grams["fit"], texts["fit"], d, near_fit)
                seconds.append(s)
                n = split.fit.num_items
                val[d] = rank_queries(lambda q, a, b: decoder.scores(q.csr(n, a, b)), split.val, n).metrics(n)["ndcg@10"]
        best = max(val, key=val.get)
        decoder, s = fit(grams["train"], texts["train"], best, {})
        n = split.train.num_items
        test = rank_queries(lambda q, a, b: decoder.scores(q.csr(n, a, b)), split.test, n).metrics(n)
        rows.append({"method": method, "items": n, "lam": best.lam, "text_weight": best.text_weight,
                     "hr@10": round(test["hr@10"], 4), "ndcg@10": round(test["ndcg@10"], 4),
                     "val_ndcg@10": round(val[best], 4), "fit_s": round(s, 1),
                     "grid_fit_s_mean": round(float(np.mean(seconds)), 1)})
        print(rows[-1], flush=True)
    dense, hood = rows
    ratios = {m: round(hood[m] / dense[m], 3) for m in ("hr@10", "ndcg@10")}
    sweep = []
    best = DecoderConfig(lam=hood["lam"], text_weight=hood["text_weight"], method="neighbourhood",
                         k_side=cfg.decoder_k_side, cold_weight=cfg.decoder_cold_weight)
    for k in (16, 32, 64, 128):
        decoder, s = fit(grams["train"], texts["train"], best.model_copy(update={"k_co": k}), {})
        n = split.train.num_items
        test = rank_queries(lambda q, a, b: decoder.scores(q.csr(n, a, b)), split.test, n).metrics(n)
        sweep.append({"k_co": k, "fit_s": round(s, 1), "hr@10": round(test["hr@10"], 4),
                      "ndcg@10": round(test["ndcg@10"], 4)})
        print(sweep[-1], flush=True)
    sizes = by_size(grams["train"], texts["train"], best.model_copy(update={"k_co": cfg.decoder_k_co}), [1, 2, 3])
    report = {"machine": machine(), "data": str(data), "seed": args.seed, "test_queries": len(split.test),
              "methods": rows, "neighbourhood_over_dense": ratios, "k_co_sweep": sweep, "by_size": sizes}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "decoder.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    cols = list(rows[0])
    lines = ["# Decoder: dense against neighbourhood", "",
             f"{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['cpu']}. `python bench/decoder.py` on "
             f"{data.name}, seed {args.seed}, {len(split.test)} test orders (text side information, no GNN).", ""]
    lines += table(cols, rows)
    lines += ["", f"Neighbourhood / dense: HR@10 {ratios['hr@10']}, NDCG@10 {ratios['ndcg@10']}.", "",
              "Neighbourhood fit at the chosen λ and text weight, by co-purchase neighbours per item:", ""]
    lines += table(list(sweep[0]), sweep)
    lines += ["", "One fit by catalog size (K copies of the shop, each fit in its own process):", ""]
    lines += table(list(sizes[0]), sizes)
    (OUT / "decoder.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
