"""`make results`: docs/results.md and the README's results table, rendered from bench/results/*.json, and
docs/configuration.md, rendered from the settings models.

Every figure is read from a benchmark's JSON file and shown with the date, machine and commit that file
records, so no number in the docs is typed by hand. The README's table sits between the markers
``<!-- results:begin -->`` and ``<!-- results:end -->``; this script rewrites it, and
tests/test_docs.py fails when it differs from what this script would write.
Usage: ``python bench/render.py [--check]`` (``--check``: exit 1 instead of writing when a file would change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bundlegnn.provenance import describe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
EXAMPLE_BEGIN, EXAMPLE_END = "<!-- bundle-example:begin -->", "<!-- bundle-example:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _source(name: str, machine: dict | None) -> str:
    if not machine:
        return f"`{name}.md`"
    return f"`{name}.md` ({machine.get('date', '?')[:10]}, {machine.get('commit', '?')})"


def _pct(g: dict) -> str:
    return f"{g['gain']:+.1%} [{g['low']:+.1%}, {g['high']:+.1%}]"


def _builder_vs_top(domain: dict) -> tuple[dict, dict, str]:
    """One domain of a bundle evaluation, one_item queries: the builder's and the top complements' metrics and
    the builder's F1 gain over them."""
    s = domain["settings"]["one_item"]
    gain = domain["comparisons"]["one_item"]["builder vs top_complements"]["f1_top1"]
    return s["builder"], s["top_complements"], _pct(gain)


def rows() -> list[tuple[str, str, str]]:
    """(what, result, source) for each headline figure whose file exists."""
    out: list[tuple[str, str, str]] = []
    if (orii := _load("eval_online_retail_ii")) is not None:
        m, p, gains = orii["methods"], orii.get("provenance", {}), orii["comparisons"]["methods"]
        out.append(("Basket completion, Online Retail II (European subset), HR@10: gnn vs EASE^R",
                    f"{m['gnn']['hr@10']:.3f} vs {m['ease']['hr@10']:.3f}: {_pct(gains['gnn vs ease']['hr@10'])} "
                    f"(seeds {orii['seeds']})", _source("eval_online_retail_ii", p)))
    if (full := _load("eval_online_retail_ii_full")) is not None:
        m, p, gains = full["methods"], full.get("provenance", {}), full["comparisons"]
        cold = gains["cold_start"]["gnn vs text_ease"]
        out.append(("Basket completion, Online Retail II full (1 M rows, 5k items), HR@10: gnn vs EASE^R; the GNN's "
                    "own gain (vs text_ease) on cold-start queries",
                    f"{m['gnn']['hr@10']:.3f} vs {m['ease']['hr@10']:.3f}: {_pct(gains['methods']['gnn vs ease']['hr@10'])}; "
                    f"cold start {_pct(cold['hr@10'])} (seeds {full['seeds']})",
                    _source("eval_online_retail_ii_full", p)))
    if (cj := _load("eval_completejourney")) is not None:
        m, p = cj["methods"], cj.get("provenance", {})
        source = _source("eval_completejourney", p)
        peers = [k for k in m if k not in ("gnn", "gnn_head", "text_ease")]
        best = max(peers, key=lambda k: m[k]["hr@10"])
        gains = cj["comparisons"]["methods"]
        own = (f"; the GNN's own gain (vs text_ease) {_pct(gains['gnn vs text_ease']['ndcg@10'])} NDCG@10"
               if "gnn vs text_ease" in gains else "")
        out.append(("Basket completion, Complete Journey (92k items), HR@10 / NDCG@10",
                    f"gnn {m['gnn']['hr@10']:.3f} / {m['gnn']['ndcg@10']:.3f}; best peer ({best}) "
                    f"{m[best]['hr@10']:.3f} / {m[best]['ndcg@10']:.3f}: "
                    f"{_pct(gains[f'gnn vs {best}']['hr@10'])} HR@10{own} (seeds {cj['seeds']})", source))
    if (b := _load("bundles")) is not None:
        cells = [f"{d['domain']} {builder['f1_top1']:.3f} vs {top['f1_top1']:.3f} ({gain})"
                 for d in b["domains"] for builder, top, gain in [_builder_vs_top(d)]]
        out.append(("Bundles vs real bundles, F1 of the first bundle: builder vs top complements (strict default "
                    "rules)", "; ".join(cells), _source("bundles", b.get("machine"))))
    tuned = [(name, t) for name in ("electronic", "clothing", "food") if (t := _load(f"bundles_tuned_{name}"))]
    if tuned:
        cells = [f"{d['domain']} {gain} at a substitute rate of {builder['substitute_rate']:.3f} vs "
                 f"{top['substitute_rate']:.3f}"
                 for _, t in tuned for d in t["domains"] for builder, top, gain in [_builder_vs_top(d)]]
        sources = [_source(f"bundles_tuned_{name}", t.get("machine")) for name, t in tuned]
        out.append(("The same under each domain's rules picked on validation bundles (variants allowed): F1 "
                    "gain, substitute rate builder vs top complements", "; ".join(cells), "; ".join(sources)))
    if (y := _load("youshu")) is not None:
        g, best = y["methods"]["gnn"], max(y["published"].items(), key=lambda kv: kv[1][0])
        out.append(("Youshu user → bundle, Recall@20 / NDCG@20",
                    f"gnn {g['recall']:.4f} / {g['ndcg']:.4f} (seeds {y['seeds']}); best published "
                    f"{best[0]} {best[1][0]:.4f} / {best[1][1]:.4f}", _source("youshu", y.get("machine"))))
    if (ms := _load("model_scale")) is not None:
        cells = [f"{r['shop']} ({r['items']:,} items) {r['train_s'] / 60:.1f} min, {r['peak_rss_gb']:.1f} GB "
                 f"(commit {r['commit']})"
                 for r in ms["shops"]]
        out.append(("`bundlegnn train` time and peak RSS", "; ".join(cells), _source("model_scale", ms.get("machine"))))
    if (st := _load("streaming")) is not None:
        cells = [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''} {r['orders_per_s_all']:,.0f} orders/s, "
                 f"p99 {r['latency_p99_ms']:.0f} ms" for r in st["runs"] if r["scale"] == max(x["scale"] for x in st["runs"])]
        out.append((f"Stream worker, {max(x['scale'] for x in st['runs'])}× Online Retail II backlog", "; ".join(cells),
                    _source("streaming", st.get("machine"))))
    if (api := _load("api")) is not None:
        r, rate = api["results"], api["rate"]
        keys = {name: f"{name}, cached, {rate}/s" for name in ("item bundles", "cart completion")}
        cells = [f"{name} p99 {r[key]['p99_ms']:.1f} ms at {rate:,} req/s" for name, key in keys.items() if key in r]
        cells += [f"item bundles p99 {x['p99_ms']:.1f} ms beside {x['searches'] / api['seconds']:g} searches/s "
                  f"(p50 {x['search_p50_ms']:.0f} ms) over a {api.get('search_catalog', 0):,}-item catalog"
                  for x in r.values() if "searches" in x]
        out.append(("HTTP API lookups (cached responses)", "; ".join(cells), _source("api", api.get("machine"))))
    return out


def table() -> str:
    lines = ["| what | result | from `bench/results/` |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows()]
    return "\n".join(lines) + "\n"


def _short(title: str, width: int = 60) -> str:
    return title if len(title) <= width else title[: width - 1].rstrip() + "…"


def bundle_example() -> str:
    """One real test bundle of the first domain in ``bundles.json`` beside the bundle the API built for its
    first item, with the API's label (``evaluate --task bundle`` picks the query; see
    :func:`serving.bundle_eval.example`)."""
    b = _load("bundles")
    ex = next((d["example"] for d in (b or {}).get("domains", []) if d.get("example")), None)
    if ex is None:
        return "(no bundle example: run `make bench`)\n"
    real, built = ex["real"], ex["built"]["items"]
    found = len({i["item_id"] for i in real[1:]} & {i["item_id"] for i in built[1:]})
    lines = [f"A real {b['domains'][0]['domain']} bundle from the test split (intent \"{ex['intent'].strip()}\") "
             f"beside what the API builds for its first item, labelled **\"{ex['built']['label']}\"**: "
             f"{found} of its {len(real) - 1} other members found; from {_source('bundles', b.get('machine'))}.\n",
             "| real bundle | built by the API | why |", "| --- | --- | --- |"]
    for k in range(max(len(real), len(built))):
        r = _short(real[k]["title"]) if k < len(real) else ""
        m = built[k] if k < len(built) else None
        lines.append(f"| {r} | {_short(m['title']) if m else ''} | {m['why'] if m else ''} |")
    return "\n".join(lines) + "\n"


def results_md() -> str:
    """docs/results.md: the headline table, then where each benchmark ran."""
    lines = ["# Results\n", "Rendered by `make results` (`bench/render.py`) from `bench/results/*.json`; each row names "
             "its file, the date and the commit it was measured on.\n", table()]
    lines.append("\n## Machines\n")
    for name in ("bundles", "youshu", "model_scale", "streaming", "api", "scale", "decoder"):
        found = _load(name)
        if found and (m := found.get("machine")):
            lines.append(f"- `{name}`: {describe(m)}")
    for name in ("eval_online_retail_ii", "eval_online_retail_ii_full", "eval_completejourney"):
        if (found := _load(name)) is not None and (p := found.get("provenance")):
            lines.append(f"- `{name}`: {describe(p)}")
    return "\n".join(lines) + "\n"


def configuration_md() -> str:
    """docs/configuration.md: every settings key with its environment variable, default and description, from
    the settings models themselves (so the page cannot drift from the code)."""
    from pydantic import BaseModel

    from bundlegnn.config import ENV_PREFIX, Settings

    def walk(model: type[BaseModel], prefix: tuple[str, ...] = ()):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation, prefix + (name,))
            else:
                yield prefix + (name,), field

    def default(field) -> str:
        if field.default_factory is not None:
            return f"`{json.dumps(field.default_factory(), default=str)}`"
        return "required" if field.is_required() else f"`{json.dumps(field.default, default=str)}`"

    lines = ["# Configuration\n",
             "Rendered by `make results` (`bench/render.py`) from the settings models (`bundlegnn/config.py` and "
             "the sections it imports). A config file is YAML with these keys (`configs/default.yaml`, "
             "`configs/production.yaml`); an environment variable overrides the file: "
             f"`{ENV_PREFIX}<SECTION>__<KEY>` (nested keys joined by `__`), e.g. "
             f"`{ENV_PREFIX}GRAPH__HALF_LIFE_DAYS=30`; a list is JSON (`[10, 5]`) and `null` is null "
             f"(`{ENV_PREFIX}TRAINING__GNN_BUDGET_S=null`: no time limit). Unknown keys and variables are refused "
             "with their name.\n"]
    section = None
    for path, field in walk(Settings):
        if path[0] != section:
            section = path[0]
            lines += [f"\n## `{section}`\n", "| key | environment variable | default | what |", "| --- | --- | --- | --- |"]
        what = (field.description or "").replace("|", "\\|").replace("\n", " ")
        env = ENV_PREFIX + "__".join(p.upper() for p in path)
        value = default(field).replace("|", "\\|")
        lines.append(f"| `{'.'.join(path)}` | `{env}` | {value} | {what} |")
    return "\n".join(lines) + "\n"


def _between(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + text[stop:]


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the table (:func:`table`) and the bundle example (:func:`bundle_example`)
    between their markers."""
    return _between(_between(text, BEGIN, END, table()), EXAMPLE_BEGIN, EXAMPLE_END, bundle_example())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    targets = {ROOT / "docs" / "results.md": results_md(), ROOT / "docs" / "configuration.md": configuration_md(),
               ROOT / "README.md": readme_with_table((ROOT / "README.md").read_text())}
    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} differs from what bench/render.py writes", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(targets[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
