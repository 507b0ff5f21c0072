"""``bundlegnn train``: train on the whole graph and write a versioned artifact.

The last ``val_frac`` of the orders before the comparison window is held out
for early stopping; the model trains on the orders before that. With a
window (``--promote``) the latest orders are kept out as well, so candidate
and live model can be compared on orders neither saw (:mod:`training.promote`).
The saved item views come from one inductive pass over every event, so they
reflect every order.

Only one graph store is held at a time: training reads the store of the
orders before validation; the store of every event is built after it, from a
fresh pass over the events, once the first is released (a large shop's store
is gigabytes: the 40× Online Retail II shop's is about 5 GB).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch_geometric.typing import WITH_PYG_LIB

from graph.events import Interaction, ItemUpserted, Order
from graph.store import GraphConfig, GraphStore
from training.artifact import Artifact, new_version, save_artifact
from training.complements import BundleUpdate, ComplementScorer, ScorerConfig
from training.encoder import TextEncoder
from training.models import BundleGNN, DecoderConfig
from training.protocol import Events, Split, rank_queries, time_split
from training.train import (Graph, Phases, TrainConfig, TrainResult, UserHead, decoder_for, head_scores, id_table,
                            pipeline_scores, select_device, side_views, train)

Event = ItemUpserted | Interaction | Order
log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A freshly trained model and the split it was trained on."""

    result: TrainResult
    split: Split
    id_items: list[str]  # the model's ID table
    text_train: np.ndarray | None  # text of split.train's catalog (None without a window: no train store)
    seconds: float
    text_fit: np.ndarray | None = None  # text of split.fit's catalog (None once the fit store is released)


def fit(events: Events, train_cfg: TrainConfig, graph_cfg: GraphConfig, encoder: TextEncoder,
        val_frac: float = 0.1, window_frac: float = 0.0) -> Candidate:
    """Train on the orders before the validation slice (and before the window, if any)."""
    started = time.perf_counter()
    phases = Phases()
    split = time_split(events, graph_cfg, seed=train_cfg.seed, test_frac=window_frac, val_frac=val_frac,
                       with_train=window_frac > 0)
    phases.done("split")
    text_fit = encoder.encode([it.text for it in split.fit.catalog])
    text_train = encoder.encode([it.text for it in split.train.catalog]) if split.train is not None else None
    phases.done("encode", texts=split.fit.num_items)
    result = train(split.fit, text_fit, train_cfg, val=split.val)
    result.phases = {**phases.seconds, **result.phases}
    return Candidate(result, split, id_table(split.fit), text_train, time.perf_counter() - started, text_fit)


def window_metrics(model: BundleGNN, id_items: list[str], decoder: DecoderConfig | None, user_weight: float,
                   head_weight: float, cand: Candidate, train_cfg: TrainConfig, device: str) -> dict[str, float]:
    """A model's metrics on the candidate's window, run inductively over the graph before it (its decoder,
    if any, refitted on that graph with the model's own settings)."""
    graph = Graph.build(cand.split.train, cand.text_train, select_device(device), id_items=id_items,
                        co_per_item=train_cfg.co_edges_per_item, ui_per_user=train_cfg.ui_edges_per_user)
    head = UserHead.of(model, graph)
    base = decoder_for(decoder, graph, side_views(model, graph, head.h["item"])) if decoder else \
        head_scores(model, graph, head.h)
    n = cand.split.train.num_items
    return rank_queries(pipeline_scores(base, graph, user_weight, head, head_weight), cand.split.test, n).metrics(n)


def live_metrics(live: Artifact, cand: Candidate, encoder: TextEncoder, train_cfg: TrainConfig,
                 device: str) -> dict[str, float]:
    """The live model on the candidate's window (its encoder must be this job's)."""
    if live.manifest.get("encoder") != encoder.model_id:
        raise ValueError(f"live model {live.version} uses encoder {live.manifest.get('encoder')!r}, this job "
                         f"{encoder.model_id!r}: they cannot be compared on the same inputs")
    return window_metrics(live.model.to(select_device(device)), live.manifest["id_items"], live.decoder,
                          live.manifest.get("user_weight", 0.0), live.manifest.get("head_weight", 0.0), cand,
                          train_cfg, device)


def validation_lists(cand: Candidate, scorer_cfg: ScorerConfig, max_orders: int = 500
                     ) -> tuple[GraphStore, list[BundleUpdate], list[list[str]]]:
    """The lists the candidate would publish before the validation orders, and (a seeded sample of at most
    ``max_orders`` of) those orders: the store before validation, the update of every item of the sampled
    orders and of every item their lists name (an item's fit with its complements is read both ways), and
    the orders as item ids. Empty when the candidate has no decoder or no validation orders. Call it once,
    before :func:`full_store` releases the store; it releases the candidate's views and decoder rows. Its
    seconds are the job's ``validation_lists`` phase."""
    phases = Phases()
    split, lists = cand.split, cand.result.fit_lists
    if split.fit is None or cand.text_fit is None:
        raise ValueError("validation_lists needs the candidate's fit store: call it before full_store")
    store = split.fit
    if lists is None or not len(split.val):
        return store, [], []
    picked = np.random.default_rng([int(split.protocol["seed"]), 7]).permutation(len(split.val))[:max_orders]
    ids = store.items.ids
    orders = [[ids[r] for r in (*split.val.items[q].tolist(), int(split.val.hidden[q]))] for q in sorted(picked)]
    scorer = ComplementScorer(store, scorer_cfg)
    rows = store.text_rows()
    scorer.set_text(rows, cand.text_fit[rows])
    scorer.set_views("validation", ids, lists.src, lists.dst, lists.prior, cand.result.model.temperature,
                     (ids, lists.index, lists.weight))
    updates = {i: scorer.update(i) for order in orders for i in order}
    for u in list(updates.values()):
        for c in u.complements:
            if c.item_id not in updates:
                updates[c.item_id] = scorer.update(c.item_id)
    cand.result.fit_lists = None  # read once: 1.6 KB an item at the default decoder_top_k
    phases.done("validation_lists", orders=len(orders), lists=len(updates))
    cand.result.phases.update(phases.seconds)
    return store, list(updates.values()), orders


def release_fit(cand: Candidate) -> None:
    """Drop the candidate's fit store and its text when nothing reads them any more (no window: training and
    :func:`validation_lists` are done), so a later store is never held beside it."""
    if cand.split.train is None:
        cand.split.fit, cand.text_fit = None, None


def before(events: Events, epoch: float) -> Events:
    """The events dated before ``epoch`` (events are in time order): a list for a list, a function that reads
    them afresh for a function."""
    if callable(events):
        return lambda: itertools.takewhile(lambda e: e.epoch < epoch, events())
    return list(itertools.takewhile(lambda e: e.epoch < epoch, events))


def earlier_folds(events: Events, cand: Candidate, folds: int, train_cfg: TrainConfig, graph_cfg: GraphConfig,
                  encoder: TextEncoder, scorer_cfg: ScorerConfig, min_orders: int = 20
                  ) -> Iterator[tuple[GraphStore, list[BundleUpdate], list[list[str]]]]:
    """:func:`validation_lists` of ``folds`` more candidates, one at a time, each trained (as ``cand``) on the
    events before the previous one's validation orders, so each fold's orders are new to every list: more
    orders to fit the bundle builder's pair model on than one validation slice holds
    (``training.pair_folds``). Stops early, with a warning, when a fold would validate on fewer than
    ``min_orders`` orders. Release ``cand``'s fit store first (:func:`release_fit`): each fold holds its
    own while it trains."""
    later = cand
    for k in range(folds):
        val_frac, until = later.split.protocol["val_frac"], later.split.protocol["val_from_epoch"]
        validating = int(later.split.protocol["train_orders"] * (1 - val_frac) * val_frac)  # about: ties at the cut
        if validating < min_orders:
            log.warning("pair model: %d of %d earlier folds trained; the next would validate on %d orders, "
                        "fewer than %d", k, folds, validating, min_orders)
            return
        later = fit(before(events, until), train_cfg, graph_cfg, encoder, val_frac)
        yield validation_lists(later, scorer_cfg)
        release_fit(later)  # read by the caller before it asks for the next fold


def full_store(cand: Candidate, events: Events, graph_cfg: GraphConfig) -> GraphStore:
    """The store of every event, every order kept, built afresh. Without a window the candidate's fit store
    is released first (nothing reads it after training), so two stores are never held together."""
    release_fit(cand)
    store = GraphStore(graph_cfg.model_copy(update={"order_window_days": None}))  # the decoder reads every order
    store.apply_all(events() if callable(events) else events)
    return store


def save(cand: Candidate, store: GraphStore, train_cfg: TrainConfig, encoder: TextEncoder, model_store: Path,
         snapshot_id: str, extra: dict | None = None) -> tuple[Path, dict]:
    """Embed every item of ``store`` (:func:`full_store`) and write the artifact; return its path and summary."""
    started = time.perf_counter()
    phases = Phases()
    text = encoder.encode([it.text for it in store.catalog])
    model, decoder = cand.result.model, cand.result.decoder
    graph = Graph.build(store, text, select_device(train_cfg.device), id_items=cand.id_items,
                        co_per_item=train_cfg.co_edges_per_item, ui_per_user=train_cfg.ui_edges_per_user)
    with torch.no_grad():
        h = graph.embed(model)
    rows = decoder_for(decoder, graph, side_views(model, graph, h["item"])).top_rows(train_cfg.decoder_top_k) \
        if decoder else None
    phases.done("final_decoder")
    history = cand.result.history
    best = history[cand.result.best_epoch - 1] if history else {}
    summary = {
        "snapshot_id": snapshot_id,
        "encoder": encoder.model_id,
        "graph": store.config.model_dump(),
        "training": train_cfg.model_dump(),
        "metrics": {k: v for k, v in best.items() if k.startswith("val_")},
        "decoder": decoder.model_dump() if decoder else None,
        "decoder_val_ndcg@10": cand.result.decoder_val.get(decoder) if decoder else None,
        "gnn_weight": cand.result.gnn_weight,
        "gnn_in_decoder": bool(cand.result.gnn_weight) if decoder else None,
        "user_weight": cand.result.user_weight,
        "head_weight": cand.result.head_weight,
        "gnn_used": cand.result.gnn_used,
        "best_epoch": cand.result.best_epoch,
        "gnn_steps": cand.result.gnn_steps,
        "epochs_run": len(history),
        "items": store.num_items,
        "device": str(select_device(train_cfg.device)),
        "pyg_lib": WITH_PYG_LIB,
        "train_seconds": round(cand.seconds + time.perf_counter() - started, 1),
        "phases": {**cand.result.phases, **phases.seconds},
        **(extra or {}),
    }
    path = save_artifact(model_store, new_version(snapshot_id), model, h, store.items.ids, cand.id_items, summary, rows)
    return path, summary


def train_job(events: Events, graph_cfg: GraphConfig, train_cfg: TrainConfig,
              encoder: TextEncoder, model_store: Path, snapshot_id: str, val_frac: float = 0.1) -> tuple[Path, dict]:
    """Train on everything (no comparison window), then save under ``model_store``."""
    cand = fit(events, train_cfg, graph_cfg, encoder, val_frac)
    return save(cand, full_store(cand, events, graph_cfg), train_cfg, encoder, model_store, snapshot_id)
