"""The promotion gate of the retraining job: a new model goes live only if it is better.

Candidate and live model are scored on the same queries: the latest
``window_frac`` of placed orders, which the candidate never trained on, with
both models run inductively over the graph before that window. The live
model may have trained on part of the window (it is older, but not
necessarily by a whole window), which can only favour it: the gate errs
towards keeping what runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.artifact import Artifact
from training.encoder import TextEncoder
from training.job import Candidate, live_metrics, window_metrics
from training.train import TrainConfig


class PromotionConfig(BaseModel):
    """The ``promotion:`` section of a config file."""

    model_config = ConfigDict(extra="forbid")

    window_frac: float = Field(0.1, gt=0, lt=0.5, description="latest share of orders both models are compared on")
    val_frac: float = Field(0.1, gt=0, lt=0.5, description="share of the orders before the window for early stopping")
    metric: Literal["ndcg@10", "hr@10", "recall@20", "mrr"] = Field(
        "ndcg@10", description="what candidate and live model are compared on, over the newest orders")
    min_gain: float = Field(0.0, ge=0, description="relative improvement the candidate needs, e.g. 0.01 for 1 %")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate goes live, and the numbers that decided it."""

    promoted: bool
    reason: str
    metric: str
    candidate: dict[str, float]
    live: dict[str, float] | None
    live_version: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def decide(candidate: dict[str, float], live: dict[str, float] | None, live_version: str | None,
           cfg: PromotionConfig) -> Decision:
    """Promote when there is no live model, or the candidate beats it by ``min_gain`` on ``metric``; ties keep the live one."""
    m = cfg.metric
    new = candidate[m]

    def result(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, reason, m, candidate, live, live_version)

    if math.isnan(new):
        return result(False, "the comparison window has no queries: nothing to judge the candidate on")
    if live is None:
        return result(True, f"no live model: the candidate goes live ({m} {new:.4f})")
    old = live[m]
    need = old * (1 + cfg.min_gain)
    if new > need:
        return result(True, f"candidate {m} {new:.4f} beats live {old:.4f} ({(new / old - 1) * 100 if old else math.inf:+.1f} %)")
    return result(False, f"candidate {m} {new:.4f} does not beat live {old:.4f}"
                  + (f" by the required {cfg.min_gain:.1%}" if cfg.min_gain else ""))


def judge(cand: Candidate, live: Artifact | None, encoder: TextEncoder, train_cfg: TrainConfig, device: str,
          cfg: PromotionConfig) -> Decision:
    """Score the candidate and the live model on the candidate's window, then :func:`decide`."""
    new = window_metrics(cand.result.model, cand.id_items, cand.result.decoder, cand.result.user_weight,
                         cand.result.head_weight, cand, train_cfg, device)
    old = live_metrics(live, cand, encoder, train_cfg, device) if live is not None else None
    return decide(new, old, live.version if live is not None else None, cfg)
