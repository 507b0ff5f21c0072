"""The retraining job's promotion gate: worse models never go live, better ones reach running workers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from streaming.producer import replay
from tests.kafka_helpers import ROOT, Reader, WorkerProcess, stream_env, topic
from tests.test_streaming import SAMPLE, producer_for
from training.artifact import latest_artifact, load_artifact, prune_artifacts
from tests.conftest import retail_events
from training.promote import PromotionConfig, decide


def metrics(ndcg: float) -> dict[str, float]:
    return {"hr@10": ndcg * 1.5, "ndcg@10": ndcg, "recall@20": ndcg * 2, "mrr": ndcg}


def test_decide_promotes_only_a_strictly_better_candidate() -> None:
    cfg = PromotionConfig()
    assert decide(metrics(0.1), None, None, cfg).promoted  # nothing live yet
    better = decide(metrics(0.21), metrics(0.2), "v1", cfg)
    assert better.promoted and better.live_version == "v1" and "+5.0 %" in better.reason
    assert not decide(metrics(0.2), metrics(0.2), "v1", cfg).promoted  # a tie keeps what runs
    worse = decide(metrics(0.19), metrics(0.2), "v1", cfg)
    assert not worse.promoted and worse.reason == "candidate ndcg@10 0.1900 does not beat live 0.2000"
    assert not decide(metrics(0.21), metrics(0.2), "v1", PromotionConfig(min_gain=0.1)).promoted
    assert decide(metrics(0.23), metrics(0.2), "v1", PromotionConfig(min_gain=0.1)).promoted
    by_hr = PromotionConfig(metric="hr@10")
    assert decide({**metrics(0.1), "hr@10": 0.5}, metrics(0.2), "v1", by_hr).promoted
    assert not decide(metrics(math.nan), None, None, cfg).promoted  # an empty window judges nothing


def bundlegnn(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bundlegnn.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def report(run: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(run.stdout[run.stdout.index("{\n"):])


# A model whose weights barely moved from their random start, and one that trained.
# weak: an untrained GNN scoring with its own cosine head (the decoder alone would already be strong)
WEAK = {"BUNDLEGNN_TRAINING__LR": "1e-9", "BUNDLEGNN_TRAINING__EPOCHS": "1", "BUNDLEGNN_TRAINING__DECODER": "false"}
GOOD = {"BUNDLEGNN_TRAINING__EPOCHS": "15"}


@pytest.mark.broker
def test_the_model_store_keeps_the_newest_versions_it_is_told_to(tmp_path: Path) -> None:
    """A daily retraining at 200k items adds 730 MB a promotion (measured): the store keeps the newest few."""
    for version in ("20261201T000000-a", "20261202T000000-b", "20261203T000000-c", "20261204T000000-d"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "manifest.json").write_text("{}")
    (tmp_path / ".20261205T000000-e.tmp").mkdir()  # a version being written: not one yet
    removed = prune_artifacts(tmp_path, keep=2)
    assert [p.name for p in removed] == ["20261201T000000-a", "20261202T000000-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".20261205T000000-e.tmp", "20261203T000000-c",
                                                          "20261204T000000-d"]
    assert prune_artifacts(tmp_path, keep=2) == [] and latest_artifact(tmp_path).name == "20261204T000000-d"


def test_worse_model_is_refused_better_one_is_promoted_and_hot_swapped(broker: str, tmp_path: Path) -> None:
    env = {**stream_env(broker, tmp_path / "state"), "BUNDLEGNN_TRAINING__HIDDEN": "32",
           "BUNDLEGNN_STREAM__ENCODE_TEXT": "false", "BUNDLEGNN_LOG__FORMAT": "json",
           "BUNDLEGNN_PATHS__KEEP_MODELS": "1"}
    store = tmp_path / "state" / "models"
    first = bundlegnn({**env, **WEAK}, "train", "--data", str(SAMPLE))  # the live model: weak
    assert first.returncode == 0, first.stderr[-2000:]
    weak = load_artifact(latest_artifact(store)).version

    worker = WorkerProcess(env, tmp_path / "worker.log", "--model", "latest").start()
    updates = Reader(broker, topic(env, "bundle_updates"))
    swaps = Reader(broker, topic(env, "model_updates"))
    try:
        with producer_for(env, broker) as producer:
            replay(retail_events(SAMPLE), producer, progress=False)
        updates.wait_for(lambda r: json.loads(r.value)["model_version"] == weak)

        # a better candidate, trained on the topics themselves: promoted, published, loaded by the worker
        better = bundlegnn({**env, **GOOD}, "train", "--from-topics", "--promote")
        assert better.returncode == 0, better.stderr[-2000:]
        out = report(better)
        gate = out["promotion"]
        assert out["promoted"] and out["published"] and gate["live_version"] == weak
        assert gate["candidate"]["ndcg@10"] > gate["live"]["ndcg@10"] and gate["window_queries"] >= 10
        assert out["source"]["events"] > 1000 and out["source"]["rejected"] == 0
        new = Path(out["artifact"]).name
        assert load_artifact(latest_artifact(store)).version == new
        assert out["removed_versions"] == [weak] and [p.name for p in store.iterdir()] == [new]  # keep_models 1
        announced = json.loads(swaps.wait_for(lambda r: True).value)
        assert announced == {"path": str(Path(out["artifact"]).resolve()), "version": new}
        swapped = json.loads(updates.wait_for(lambda r: json.loads(r.value)["model_version"] == new, timeout=60).value)
        assert swapped["complements"] and swapped["complements"][0]["source"] == "decoder"

        # a worse candidate: refused with exit 3 and its numbers; nothing written, nothing announced
        worse = bundlegnn({**env, **WEAK}, "train", "--from-topics", "--promote")
        assert worse.returncode == 3, worse.stderr[-2000:]
        gate = report(worse)["promotion"]
        assert not gate["promoted"] and gate["live_version"] == new
        assert gate["candidate"]["ndcg@10"] < gate["live"]["ndcg@10"] and "does not beat live" in gate["reason"]
        assert [p.name for p in store.iterdir()] == [new]
        logged = [json.loads(line) for line in worse.stderr.splitlines() if line.startswith("{")]
        assert any(r["logger"] == "bundlegnn.train" and "does not beat" in r["msg"] for r in logged)
        assert len(swaps.drain(2.0)) == 1
        assert "model-updates message refused" not in worker.output()
    finally:
        updates.close()
        swaps.close()
        worker.stop()
