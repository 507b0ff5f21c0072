"""`bundlegnn evaluate`'s protocol end to end on a small real sample: every method, both cold-start slices."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from graph.store import GraphConfig
from tests.conftest import DATA, retail_events
from training import baselines
from training.evaluation import evaluate, markdown, summarise
from training.train import TrainConfig

SAMPLE = DATA / "online_retail_ii_sample.csv.gz"


def test_every_method_on_both_splits(tmp_path: Path) -> None:
    from training.encoder import TextEncoder

    events = retail_events(SAMPLE)
    cfg = TrainConfig(epochs=2, hidden=16, device="cpu", decoder_lambdas=[10.0], decoder_text_weights=[30.0],
                      decoder_gnn_weights=[0.0, 10.0])
    report = evaluate(events, GraphConfig(), cfg, TextEncoder(cache_dir=tmp_path), seed=0, held_out=0.2)
    names = {"popularity", "cooccurrence", "user_history", "ease", "text", "gnn", "gnn_head", "text_ease"}
    names |= {"sansa"} if baselines.sansa_installed() else set()  # (make bench installs it)
    assert set(report["methods"]) == set(report["cold_start"]) == set(report["held_out_items"]) == names
    for part in ("methods", "held_out_items"):
        assert all(0 <= m["hr@10"] <= 1 and m["queries"] > 0 for m in report[part].values())
    held = report["held_out_items"]
    assert held["gnn"]["queries"] == report["protocol"]["held_out_test_queries"] > report["cold_start"]["gnn"]["queries"]
    # methods that need an item's orders cannot rank one held out of training
    assert held["popularity"]["hr@10"] == held["ease"]["hr@10"] == held["cooccurrence"]["hr@10"] == 0
    assert held["text"]["hr@10"] > 0 and held["gnn"]["hr@10"] > 0
    assert report["protocol"]["gnn_decoder"] is not None and report["protocol"]["text_ease"]["gnn_weight"] == 0
    head_val = report["protocol"]["head_weight_val_ndcg@10"]  # the head's grid, measured on validation
    assert set(head_val) == {str(w) for w in cfg.head_weights} and report["protocol"]["head_weight"] in cfg.head_weights
    assert head_val["0.0"] == report["protocol"]["user_weight_val_ndcg@10"][str(report["protocol"]["user_weight"])]
    summary = summarise([report, report])
    assert summary["held_out_items"]["gnn"]["hr@10"] == held["gnn"]["hr@10"]
    assert summary["held_out_items"]["gnn"]["hr@10_std"] == 0 and not math.isnan(summary["methods"]["ease"]["mrr"])
    # the gains' intervals come from the same ranks as the metrics
    assert len(report["ranks"]["methods"]["gnn"]) == report["methods"]["gnn"]["queries"]
    gains = summary["comparisons"]
    assert set(gains) == {"methods", "cold_start", "held_out_items"}
    assert set(gains["methods"]) == {f"gnn vs {m}" for m in names - {"gnn"}} | {"text_ease vs ease"}
    for name, (a, b) in {"gnn vs ease": ("gnn", "ease"), "text_ease vs ease": ("text_ease", "ease")}.items():
        for metric in ("hr@10", "ndcg@10"):
            gain = gains["methods"][name][metric]
            mean_a, mean_b = report["methods"][a][metric], report["methods"][b][metric]
            assert gain["gain"] == pytest.approx(mean_a / mean_b - 1)
            assert gain["low"] <= gain["gain"] <= gain["high"]
    tables = markdown(summary)
    assert "| gnn vs ease | " in tables and tables.count("| method |") == 3
    # a peer that could not run is said, not silently left out
    assert ("Not run: sansa" in tables) is (not baselines.sansa_installed())
    assert report["protocol"].get("peers_not_run") == (None if baselines.sansa_installed() else ["sansa"])
    assert "inf%" not in tables and "nan%" not in tables  # a gain over a method that scores 0 reads n/a
    assert f"| ease | {report['methods']['ease']['hr@10']:.4f} ± 0.0000 |" in tables
