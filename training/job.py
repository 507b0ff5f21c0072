"""``bundlegnn train``: train on the whole graph and write a versioned artifact.

The last ``val_frac`` of the orders before the comparison window is held out
for early stopping; the model trains on the orders before that. With a
window (``--promote``) the latest orders are kept out as well, so candidate
and live model can be compared on orders neither saw (:mod:`training.promote`).
The saved item views come from one inductive pass over every event, so they
reflect every order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch_geometric.typing import WITH_PYG_LIB

from graph.events import Interaction, ItemUpserted, Order
from graph.store import GraphConfig, GraphStore
from training.artifact import Artifact, new_version, save_artifact
from training.encoder import TextEncoder
from training.models import BundleGNN, DecoderConfig, top_rows
from training.protocol import Split, evaluate_scores, time_split
from training.train import (Graph, TrainConfig, TrainResult, decoder_matrix, id_table, score_queries, select_device,
                            train)

Event = ItemUpserted | Interaction | Order


@dataclass
class Candidate:
    """A freshly trained model and the split it was trained on."""

    result: TrainResult
    split: Split
    id_items: list[str]  # the model's ID table
    text_train: np.ndarray  # text of split.train's catalog
    seconds: float


def fit(events: list[Event], train_cfg: TrainConfig, graph_cfg: GraphConfig, encoder: TextEncoder,
        val_frac: float = 0.1, window_frac: float = 0.0) -> Candidate:
    """Train on the orders before the validation slice (and before the window, if any)."""
    started = time.perf_counter()
    split = time_split(events, graph_cfg, seed=train_cfg.seed, test_frac=window_frac, val_frac=val_frac)
    text_fit = encoder.encode([it.text for it in split.fit.catalog])
    text_train = encoder.encode([it.text for it in split.train.catalog])
    result = train(split.fit, text_fit, train_cfg, val=split.val)
    return Candidate(result, split, id_table(split.fit), text_train, time.perf_counter() - started)


def window_metrics(model: BundleGNN, id_items: list[str], decoder: DecoderConfig | None, cand: Candidate,
                   device: str) -> dict[str, float]:
    """A model's metrics on the candidate's window, run inductively over the graph before it (its decoder,
    if any, refitted on that graph with the model's own settings)."""
    graph = Graph.build(cand.split.train, cand.text_train, select_device(device), id_items=id_items)
    scores = score_queries(model, graph, cand.split.test, decoder)
    return evaluate_scores(scores, cand.split.test, cand.split.train.num_items)


def live_metrics(live: Artifact, cand: Candidate, encoder: TextEncoder, device: str) -> dict[str, float]:
    """The live model on the candidate's window (its encoder must be this job's)."""
    if live.manifest.get("encoder") != encoder.model_id:
        raise ValueError(f"live model {live.version} uses encoder {live.manifest.get('encoder')!r}, this job "
                         f"{encoder.model_id!r}: they cannot be compared on the same inputs")
    return window_metrics(live.model.to(select_device(device)), live.manifest["id_items"], live.decoder, cand, device)


def save(cand: Candidate, events: list[Event], graph_cfg: GraphConfig, train_cfg: TrainConfig,
         encoder: TextEncoder, model_store: Path, snapshot_id: str, extra: dict | None = None) -> tuple[Path, dict]:
    """Embed every item over the full graph and write the artifact; return its path and summary."""
    started = time.perf_counter()
    if cand.split.protocol["test_frac"] > 0:  # a window was held out: the views must see it too
        store = GraphStore(graph_cfg.model_copy(update={"order_window_days": None}))  # the decoder reads every order
        store.apply_all(events)
        text = encoder.encode([it.text for it in store.catalog])
    else:
        store, text = cand.split.train, cand.text_train
    model, decoder = cand.result.model, cand.result.decoder
    graph = Graph.build(store, text, select_device(train_cfg.device), id_items=cand.id_items)
    h = graph.embed(model)
    rows = top_rows(decoder_matrix(model, graph, decoder, h["item"]), train_cfg.decoder_top_k) if decoder else None
    history = cand.result.history
    best = history[cand.result.best_epoch - 1] if history else {}
    summary = {
        "snapshot_id": snapshot_id,
        "encoder": encoder.model_id,
        "graph": graph_cfg.model_dump(),
        "training": train_cfg.model_dump(),
        "metrics": {k: v for k, v in best.items() if k.startswith("val_")},
        "decoder": decoder.model_dump() if decoder else None,
        "decoder_val_ndcg@10": cand.result.decoder_val.get(decoder) if decoder else None,
        "best_epoch": cand.result.best_epoch,
        "epochs_run": len(history),
        "items": store.num_items,
        "device": str(select_device(train_cfg.device)),
        "pyg_lib": WITH_PYG_LIB,
        "train_seconds": round(cand.seconds + time.perf_counter() - started, 1),
        **(extra or {}),
    }
    path = save_artifact(model_store, new_version(snapshot_id), model, h, store.items.ids, cand.id_items, summary, rows)
    return path, summary


def train_job(events: list[Event], graph_cfg: GraphConfig, train_cfg: TrainConfig,
              encoder: TextEncoder, model_store: Path, snapshot_id: str, val_frac: float = 0.1) -> tuple[Path, dict]:
    """Train on everything (no comparison window), then save under ``model_store``."""
    cand = fit(events, train_cfg, graph_cfg, encoder, val_frac)
    return save(cand, events, graph_cfg, train_cfg, encoder, model_store, snapshot_id)
