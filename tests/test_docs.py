"""The docs' numbers come from the benchmark files: the README's results table and docs/results.md are what
bench/render.py renders from bench/results/*.json (run `make results` after a benchmark)."""

from __future__ import annotations

import sys

from tests.kafka_helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import render  # noqa: E402


def test_readme_results_table_is_the_rendered_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render.readme_with_table(readme) == readme, "README's results table is stale: run `make results`"
    assert render.table() in readme and len(render.rows()) >= 4  # every headline figure found its file


def test_docs_results_is_the_rendered_one() -> None:
    assert (ROOT / "docs" / "results.md").read_text() == render.results_md(), "run `make results`"
