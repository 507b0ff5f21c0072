"""``bundlegnn train``: train on the whole graph and write a versioned artifact.

The last ``val_frac`` of orders is held out for early stopping; the model is
trained on the orders before it and then run inductively on the full graph, so
the saved item views reflect every order.
"""

from __future__ import annotations

import time
from pathlib import Path

from graph.events import ItemUpserted, Order
from graph.store import GraphConfig
from training.artifact import new_version, save_artifact
from training.encoder import TextEncoder
from training.protocol import time_split
from training.train import Graph, TrainConfig, id_table, select_device, train


def train_job(events: list[ItemUpserted | Order], graph_cfg: GraphConfig, train_cfg: TrainConfig,
              encoder: TextEncoder, model_store: Path, snapshot_id: str, val_frac: float = 0.1) -> tuple[Path, dict]:
    """Train, then save under ``model_store``; return the artifact path and a summary."""
    started = time.perf_counter()
    split = time_split(events, graph_cfg, seed=train_cfg.seed, test_frac=0.0, val_frac=val_frac)
    text_fit = encoder.encode([it.text for it in split.fit.catalog])
    text_all = encoder.encode([it.text for it in split.train.catalog])
    result = train(split.fit, text_fit, train_cfg, val=split.val)
    ids = id_table(split.fit)
    graph = Graph.build(split.train, text_all, select_device(train_cfg.device), id_items=ids)
    h = graph.embed(result.model)
    best = result.history[result.best_epoch - 1] if result.history else {}
    summary = {
        "snapshot_id": snapshot_id,
        "encoder": encoder.model_id,
        "graph": graph_cfg.model_dump(),
        "training": train_cfg.model_dump(),
        "metrics": {k: v for k, v in best.items() if k.startswith("val_")},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "items": split.train.num_items,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    path = save_artifact(model_store, new_version(snapshot_id), result.model, h, split.train.items.ids, ids, summary)
    return path, summary
