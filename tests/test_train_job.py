"""`bundlegnn train` end to end on a small real sample: artifact written and loadable."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bundlegnn.cli import app
from serving.api import ModelInfo
from tests.conftest import DATA
from training.artifact import load_artifact

SAMPLE = DATA / "online_retail_ii_sample.csv.gz"  # the first 4,000 rows of online_retail_ii


def test_train_writes_a_loadable_versioned_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNDLEGNN_PATHS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUNDLEGNN_PATHS__MODEL_STORE", str(tmp_path / "models"))
    monkeypatch.setenv("BUNDLEGNN_TRAINING__EPOCHS", "2")
    monkeypatch.setenv("BUNDLEGNN_TRAINING__HIDDEN", "16")
    monkeypatch.setenv("BUNDLEGNN_TRAINING__DEVICE", "cpu")
    result = CliRunner().invoke(app, ["train", "--data", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{\n"):])
    path = Path(summary["artifact"])
    assert path.parent == tmp_path / "models" and path.name.endswith(summary["snapshot_id"][:8])
    assert summary["epochs_run"] == 2 and 0 <= summary["metrics"]["val_hr@10"] <= 1
    gc.collect()
    assert list((tmp_path / "state" / "tmp").iterdir()) == []  # the parsed events' spool is gone with the command

    art = load_artifact(path)
    n = len(art.item_ids)
    assert art.src.shape == (n, 16) and art.dst.shape == (n, 16) and art.prior.shape == (n,)
    assert np.isfinite(art.src).all() and np.isfinite(art.dst).all()
    assert art.manifest["snapshot_id"] == summary["snapshot_id"]
    # the reloaded weights reproduce the saved item views
    from graph.snapshot import load
    from training.encoder import TextEncoder
    from training.train import Graph, decoder_for, side_views

    store = load(tmp_path / "state" / "graph")
    assert store.items.ids == art.item_ids
    encoder = TextEncoder(cache_dir=tmp_path / "state" / "cache" / "text")
    encoder._encode_batch = lambda texts: pytest.fail("text should come from the cache")  # type: ignore[method-assign]
    text = encoder.encode([it.text for it in store.catalog], progress=False)
    trained = art.manifest["training"]
    graph = Graph.build(store, text, torch.device("cpu"), id_items=art.manifest["id_items"],
                        co_per_item=trained["co_edges_per_item"], ui_per_user=trained["ui_edges_per_user"])
    with torch.no_grad():
        h = graph.embed(art.model)
    assert np.allclose(h["src"].numpy(), art.src, atol=1e-5) and np.allclose(h["dst"].numpy(), art.dst, atol=1e-5)
    # ... and the decoder rows: the stored weights are the top of the refitted decoder's rows
    assert art.decoder is not None and art.decoder.model_dump() == summary["decoder"]
    assert summary["gnn_weight"] == art.decoder.gnn_weight and summary["gnn_in_decoder"] == (art.decoder.gnn_weight > 0)
    assert summary["head_weight"] in trained["head_weights"] and art.manifest["head_weight"] == summary["head_weight"]
    assert summary["gnn_used"] == bool(summary["gnn_weight"] or summary["head_weight"])
    b = decoder_for(art.decoder, graph, side_views(art.model, graph)).weights.numpy()
    assert art.decoder_index.shape == (n, min(200, n - 1)) and art.decoder_rows is not None
    assert np.allclose(np.take_along_axis(b, art.decoder_index.astype(np.int64), 1), art.decoder_weight, atol=1e-5)
    assert np.allclose(art.decoder_weight[:, 0], b.max(1), atol=1e-5)
    # the bundle builder's pair model, fitted on the validation orders, travels in the manifest
    from serving.bundle_fit import TERMS, PairModel

    pair = PairModel.model_validate(art.manifest["pair_model"])
    assert 0 < pair.positives < pair.pairs and len(pair.weights) == len(TERMS) == 42
    assert np.isfinite(pair.weights).all()
    digest = summary["pair_model"]  # `train` prints its size and largest weights, the manifest keeps it whole
    largest = sorted(zip(pair.terms, pair.weights), key=lambda tw: -abs(tw[1]))[:5]
    assert (digest["terms"], digest["pairs"], digest["positives"]) == (42, pair.pairs, pair.positives)
    assert digest["largest_weights"] == {t: round(w, 4) for t, w in largest}
    # what the API's /healthz says of the model it loaded (`bundlegnn serve`)
    info = ModelInfo.of(art.version, art.manifest, pair_model=True)
    assert (info.decoder, info.gnn_weight, info.head_weight, info.gnn_steps) == \
        ("dense", summary["gnn_weight"], summary["head_weight"], "full")


def test_load_artifact_refuses_other_directories(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model artifact"):
        load_artifact(tmp_path)
