"""Bundles against real bundles: ``bundlegnn evaluate --task bundle`` on every intent-bundles domain, with the
machine and commit, to bench/results/bundles.{json,md} (see :mod:`serving.bundle_eval`).

Usage: ``python bench/bundles.py [--seeds 0,1,2] [--data ../shared/data/amazon_intent_bundles]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale import OUT, machine  # noqa: E402

from bundlegnn.config import load_settings  # noqa: E402
from serving.bundle_eval import evaluate_domain, markdown, summarise  # noqa: E402
from training.intent_bundles import DOMAINS, IntentBundles  # noqa: E402


def header(m: dict) -> str:
    return (f"# Bundles against real bundles\n\n{m['date']}, commit {m['commit']}, {m['cpus']} cores, {m['ram_gb']} GB "
            f"RAM, {m['cpu']}. `python bench/bundles.py` (= `bundlegnn evaluate --task bundle --seeds 0,1,2`), "
            f"configs/default.yaml.\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "amazon_intent_bundles")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    settings = load_settings(ROOT / "configs" / "default.yaml")
    encoder = settings.encoder.build(settings.paths.text_cache)
    seeds = [int(s) for s in args.seeds.split(",")]
    summaries = [summarise([evaluate_domain(IntentBundles.read(args.data / d), settings.graph, settings.training,
                                            settings.scoring, settings.serving.rules, encoder, seed=s) for s in seeds])
                 for d in DOMAINS]
    report = {"machine": machine(), "domains": summaries}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bundles.json").write_text(json.dumps(report, indent=2))
    (OUT / "bundles.md").write_text(header(report["machine"]) + markdown(summaries))
    print(header(report["machine"]) + markdown(summaries))


if __name__ == "__main__":
    main()
