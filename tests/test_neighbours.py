"""The approximate nearest-neighbour index behind refresh candidates: recall on real titles, replacements."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graph.events import ItemUpserted
from tests.conftest import DATA, RETAIL_II
from training.datasets import DataConfig, read_events
from training.neighbours import VectorIndex


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    from training.encoder import TextEncoder

    return TextEncoder(cache_dir=tmp_path_factory.mktemp("enc"))


def _texts(cfg: DataConfig) -> list[str]:
    texts: dict[str, str] = {}
    for event in read_events(cfg):
        if isinstance(event, ItemUpserted):
            texts[event.item_id] = f"{event.title}. {event.description}".strip(". ")
    return list(texts.values())


def _recall(vectors: np.ndarray, k: int = 50, queries: int = 400) -> float:
    """Share of each item's exact top-``k`` neighbours by inner product that the index returns; a returned
    item whose similarity ties the k-th exact one counts (real catalogues repeat texts)."""
    index = VectorIndex(vectors.shape[1])
    index.upsert(np.arange(len(vectors)), vectors)
    rng = np.random.default_rng(0)
    found = 0
    picks = rng.choice(len(vectors), min(queries, len(vectors)), replace=False)
    for q in picks.tolist():
        sims = vectors @ vectors[q]
        sims[q] = -np.inf
        kth = np.sort(sims)[-k]
        rows, _ = index.search(vectors[q], k + 1)
        rows = rows[rows != q][:k]
        found += int((sims[rows] >= kth - 1e-4).sum())
    return found / (len(picks) * k)


@pytest.mark.parametrize("cfg", [
    DataConfig(path=RETAIL_II),
    DataConfig(path=DATA / "completejourney_transactions_sample.csv.gz",
               mapping=Path("configs/mappings/completejourney.yaml"),
               catalog_path=DATA / "completejourney_products_sample.csv.gz"),
], ids=["online_retail_ii", "completejourney"])
def test_the_index_finds_the_exact_top_50_text_neighbours_of_real_items(encoder, cfg: DataConfig) -> None:
    texts = _texts(cfg)
    vectors = encoder.encode(texts, progress=False)
    assert len(vectors) > 2500
    assert _recall(vectors) >= 0.95


def test_replaced_and_removed_vectors_are_never_returned() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    index = VectorIndex(16)
    index.upsert(np.arange(300), vectors)
    index.upsert(np.array([5, 5]), np.stack([vectors[7], -vectors[7]]))  # the last vector given wins
    rows, sims = index.search(-vectors[7], 3)
    assert rows[0] == 5 and sims[0] == pytest.approx(float(vectors[7] @ vectors[7]), rel=1e-4)
    assert 5 not in index.search(vectors[7], 10)[0][:2]
    index.upsert(np.array([9]), np.zeros((1, 16), np.float32))  # no text any more: out of the index
    assert 9 not in index.search(vectors[9], 300)[0] and len(index) == 299
    for step in range(3):  # enough replacements to rebuild: answers stay the same
        index.upsert(np.arange(100, 200), vectors[100:200] * (1 + step))
    assert index.dead == 0 or index.dead < 0.25 * len(index.row_of)
    rows, _ = index.search(vectors[150], 1)
    assert rows.tolist() == [150] and len(index) == 299
