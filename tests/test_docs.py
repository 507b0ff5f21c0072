"""The docs match the code: the README's results table and docs/results.md are what bench/render.py renders from
bench/results/*.json (run `make results` after a benchmark), and docs/importing.md's example mapping is one the
importer takes."""

from __future__ import annotations

import re
import sys

import yaml

from tests.kafka_helpers import ROOT
from training.data_config import CsvMapping

sys.path.insert(0, str(ROOT / "bench"))

import render  # noqa: E402


def test_readme_results_table_is_the_rendered_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert render.readme_with_table(readme) == readme, "README's results table is stale: run `make results`"
    assert render.table() in readme and len(render.rows()) >= 4  # every headline figure found its file


def test_docs_results_is_the_rendered_one() -> None:
    assert (ROOT / "docs" / "results.md").read_text() == render.results_md(), "run `make results`"


def test_the_example_mapping_in_docs_importing_is_a_valid_mapping_naming_every_field() -> None:
    text = (ROOT / "docs" / "importing.md").read_text()
    block = re.search(r"```yaml\n(# configs/mappings/my-shop.yaml\n.*?)```", text, re.S)
    assert block is not None
    mapping = CsvMapping.model_validate(yaml.safe_load(block.group(1)))
    assert mapping.decimal == "," and mapping.catalog is not None
    named = set(re.findall(r"^(?:# )?(\w+):", block.group(1), re.M))  # cancel_prefix: an alternative, commented
    assert named == set(CsvMapping.model_fields), "document every mapping field"
