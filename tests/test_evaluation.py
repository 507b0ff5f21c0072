"""`bundlegnn evaluate`'s protocol end to end on a small real sample: every method, both cold-start slices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bundlegnn.cli import app
from graph.store import GraphConfig
from tests.conftest import DATA, retail_events
from training import baselines
from training.evaluation import evaluate, markdown, merge, summarise
from training.protocol import per_query
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
    assert report["protocol"]["gnn_epochs_run"] == 2 and report["protocol"]["gnn_epochs_stopped_by_budget"] is False
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
    best = report["protocol"]["gnn_best_epoch"]
    assert f"GNN epochs: seed 0 2 (best {best}); seed 0 2 (best {best})." in tables  # not ended by the budget
    # a peer that could not run is said, not silently left out
    assert ("Not run: sansa" in tables) is (not baselines.sansa_installed())
    assert report["protocol"].get("peers_not_run") == (None if baselines.sansa_installed() else ["sansa"])
    assert "inf%" not in tables and "nan%" not in tables  # a gain over a method that scores 0 reads n/a
    assert f"| ease | {report['methods']['ease']['hr@10']:.4f} ± 0.0000 |" in tables


def _fake_report(seed: int, ranks: dict[str, list[int]], commit: str = "abc1234",
                 command: str = "bundlegnn evaluate --config c.yaml") -> dict:
    """What `evaluate --json` writes for one seed, with made-up ranks of two methods."""
    run = {"protocol": {"seed": seed, "test_queries": 4}, "ranks": {"methods": ranks}, "methods": {}}
    for name, r in ranks.items():
        each = per_query(torch.tensor(r))
        run["methods"][name] = {"hr@10": float(each["hr@10"].mean()), "ndcg@10": float(each["ndcg@10"].mean()),
                                "recall@20": 0.5, "mrr": 0.1, "coverage": 0.2, "queries": len(r)}
    summary = summarise([run])
    summary["provenance"] = {"commit": commit, "date": f"2026-12-0{seed + 1} 00:00 UTC", "cpus": 2, "ram_gb": 24.0,
                             "cpu": "x", "command": f"{command} --seeds {seed}", "wall_s": 10 + seed}
    return summary


def test_reports_of_separate_seeds_merge_into_the_report_of_one_run(tmp_path: Path) -> None:
    """`evaluate --merge`: one seed per job, one report whose means and intervals are those of all the runs."""
    a = _fake_report(0, {"gnn": [0, 3, 20, 1], "ease": [2, 30, 40, 1]})
    b = _fake_report(1, {"gnn": [5, 0, 12, 50], "ease": [5, 9, 0, 60]})
    merged = merge([a, b])
    direct = summarise(a["runs"] + b["runs"])
    assert merged["seeds"] == [0, 1] and merged["comparisons"] == direct["comparisons"]
    assert merged["methods"]["gnn"]["hr@10"] == pytest.approx((0.75 + 0.5) / 2)
    assert len(merged["comparisons"]["methods"]["gnn vs ease"]["hr@10"]["runs"]) == 2
    assert merged["provenance"]["command"] == "bundlegnn evaluate --config c.yaml --seeds 0,1 (merged from 2 runs)"
    assert merged["provenance"]["wall_s"] == 21 and merged["provenance"]["date"] == "2026-12-02 00:00 UTC"
    c = _fake_report(2, {"gnn": [1, 1, 30, 2], "ease": [3, 0, 11, 4]})
    again = merge([merged, c])  # a merge merged again: the runs of all three
    assert again["comparisons"] == summarise(a["runs"] + b["runs"] + c["runs"])["comparisons"]
    assert again["provenance"]["command"] == "bundlegnn evaluate --config c.yaml --seeds 0,1,2 (merged from 3 runs)"
    assert [p["command"] for p in again["provenance"]["merged"]] == [f"bundlegnn evaluate --config c.yaml --seeds {s}"
                                                                     for s in range(3)]
    with pytest.raises(ValueError, match="different commits"):
        merge([a, _fake_report(1, {"gnn": [0], "ease": [1]}, commit="def5678")])
    with pytest.raises(ValueError, match="different commands"):
        merge([a, _fake_report(1, {"gnn": [0], "ease": [1]}, command="bundlegnn evaluate --held-out 0")])
    with pytest.raises(ValueError, match="a seed repeats"):
        merge([a, a])
    paths = []
    for k, report in enumerate((a, b)):
        paths.append(tmp_path / f"s{k}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "all.json"
    result = CliRunner().invoke(app, ["evaluate", "--merge", ",".join(map(str, paths)), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["comparisons"] == direct["comparisons"]
    assert out.with_suffix(".png").exists() and "(merged from 2 runs)" in out.with_suffix(".md").read_text()
    result = CliRunner().invoke(app, ["evaluate", "--merge", f"{paths[0]},{paths[0]}"])
    assert result.exit_code == 2 and "a seed repeats" in result.output
