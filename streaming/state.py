"""The stream worker's state store: its tasks' graph, the complement scorer over it, and the live model.

One :class:`WorkerState` lives in the scoring process (:mod:`streaming.scorer`).
Events reach the graph through :meth:`graph.store.GraphStore.apply_many`,
the code path of the batch import; what they touched waits in ``pending``
for a refresh of its complement lists. The model's item views come from the
artifact; items it never saw get theirs from one inductive pass of the GNN
over the current graph (their text and neighbours).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from graph.events import ItemUpserted
from graph.store import Applied, GraphConfig, GraphEvent, GraphStore, ROUTED
from streaming.metrics import WorkerMetrics
from streaming.repartition import item_partition
from training.artifact import Artifact, load_artifact
from training.complements import ComplementScorer, ScorerConfig
from training.encoder import TextEncoder

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """The worker's in-memory graph, scorer and model, and what awaits a refresh."""

    graph_config: GraphConfig
    scorer_config: ScorerConfig
    encoder: TextEncoder | None = None
    device: str = "cpu"
    partitions: int = 1  # the tasks' count: items are partitioned among them (streaming.repartition)
    store: GraphStore = field(init=False)
    scorer: ComplementScorer = field(init=False)
    artifact: Artifact | None = None
    pending: dict[str, float] = field(default_factory=dict)  # item → newest source timestamp
    new_text: set[str] = field(default_factory=set)  # items whose text needs embedding
    needs_embedding: bool = False  # items without a model view exist
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self, store: GraphStore | None = None, pending: dict[str, float] | None = None) -> None:
        """Start from ``store`` (default: an empty graph) with ``pending`` items awaiting a refresh; the text of
        its items is embedded again (from the text cache) by the next :meth:`embed_text`."""
        self.store = store if store is not None else GraphStore(self.graph_config)
        if self.partitions > 1:
            self.store.partition(partial(item_partition, partitions=self.partitions))
        self.scorer = ComplementScorer(self.store, self.scorer_config)
        self.pending = dict(pending or {})
        self.new_text = {k for k, it in zip(self.store.items.ids, self.store.catalog) if it.has_text}
        if self.artifact is not None:
            self._install(self.artifact)

    def partition_of(self, item_id: str) -> int:
        """The task whose state holds ``item_id``'s rows (the store keeps each known item's)."""
        row = self.store.items.get(item_id)
        return int(self.store.part_of(row)) if row is not None else item_partition(item_id, self.partitions)

    def apply_many(self, events: list[GraphEvent], source_ts: list[float | None],
                   streams: list[int] | None = None) -> list[Applied]:
        """Apply events in order (one bulk graph update); return each one's outcome (``rejected``: a dead letter).

        ``streams``: each event's source partition (the task it belongs to, the stream whose time an order's
        window follows) or :data:`~graph.store.ROUTED` for a record of ``repartition``."""
        now = time.time()
        pending = self.pending
        kinds = Counter((event.type, streams is not None and streams[k] == ROUTED) for k, event in enumerate(events))
        results = self.store.apply_many(events, streams)
        for event, result, ts in zip(events, results, source_ts):
            if isinstance(event, ItemUpserted) and result.changed:
                self.new_text.add(event.item_id)
            if result.changed:
                ts = ts if ts is not None else now
                for item in result.items:  # (in a partitioned store, those of the event's task)
                    if pending.get(item, 0.0) < ts:
                        pending[item] = ts
        for (kind, routed), count in kinds.items():
            (self.metrics.routed if routed else self.metrics.events).labels(kind).inc(count)
        return results

    # ---- text and model --------------------------------------------------------
    def text_job(self) -> tuple[np.ndarray, list[str]] | None:
        """Rows and texts of items upserted since the last call (None: nothing to encode)."""
        if not self.new_text or self.encoder is None:
            self.new_text.clear()
            return None
        rows = np.array([self.store.items.index[k] for k in sorted(self.new_text)])
        self.new_text.clear()
        return rows, [self.store.catalog[r].text for r in rows]

    def set_text(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        self.scorer.set_text(rows, vectors)
        if self.artifact is not None and not all(self.scorer.has_view(int(r)) for r in rows):
            self.needs_embedding = True  # only items the model has not seen need the inductive pass

    def adopt(self, store: GraphStore, pending: dict[str, float]) -> None:
        """Take in a task's state read from its checkpoint (:meth:`graph.store.GraphStore.adopt`): its items
        without a text view yet are embedded by the next :meth:`text_job`."""
        known = self.store.num_items
        before = self.store.catalog[:known]
        self.store.adopt(store)
        catalog, ids = self.store.catalog, self.store.items.ids
        self.new_text |= {ids[r] for r in range(len(catalog)) if catalog[r].has_text
                          and (r >= known or catalog[r] is not before[r])}
        for item, ts in pending.items():
            self.pending[item] = max(ts, self.pending.get(item, 0.0))

    def embed_text(self) -> None:
        """Encode the text of items upserted since the last call (blocking; the worker uses a thread)."""
        job = self.text_job()
        if job is not None and self.encoder is not None:
            self.set_text(job[0], self.encoder.encode(job[1], progress=False))

    def load_model(self, path: str | Path) -> None:
        """Load an artifact and score with it from now on (the hot swap)."""
        artifact = load_artifact(path)
        try:
            self._install(artifact)
        except Exception:
            if self.artifact is not None:  # put the live model's views back: a half-installed one never serves
                self._install(self.artifact)
            raise
        self.artifact = artifact
        ids = self.store.items.ids
        self.pending.update({ids[r]: time.time() for r in np.flatnonzero(self.store.item_order_counts()).tolist()})
        self.metrics.model_loaded.set(time.time())
        log.info("model %s loaded from %s", artifact.version, path)

    def _install(self, artifact: Artifact) -> None:
        self.scorer.set_views(artifact.version, artifact.item_ids, artifact.src, artifact.dst, artifact.prior,
                              artifact.model.temperature, artifact.decoder_rows)
        self.needs_embedding = len(self.scorer.rows_without_view()) > 0

    def inductive_graph(self) -> Any | None:
        """The current graph as GNN input when items lack a model view (None: nothing to do).

        The model is inductive: one pass over the whole current graph gives
        items the artifact has not seen views from their text and neighbours.
        """
        if self.artifact is None or self.encoder is None or not self.needs_embedding:
            return None
        from training.train import Graph

        self.needs_embedding = False
        dim = self.artifact.model.in_channels - 1  # item features: text embedding + log price
        text = np.zeros((self.store.num_items, dim), np.float32)  # items known only from orders: no text yet
        if len(self.scorer.text):
            text[: len(self.scorer.text)] = self.scorer.text
        trained = self.artifact.manifest.get("training", {})
        return Graph.build(self.store, text, torch_device(self.device), id_items=self.artifact.manifest["id_items"],
                           co_per_item=trained.get("co_edges_per_item"), ui_per_user=trained.get("ui_edges_per_user"))

    def install_views(self, item_ids: list[str], h: dict[str, Any]) -> list[str]:
        """Give the items the model had no view of their views from an inductive pass over ``item_ids`` (the
        store's items when the pass began); return them."""
        assert self.artifact is not None
        rows = self.scorer.rows_without_view()
        rows = rows[rows < len(item_ids)]
        prior = self.artifact.model.prior(h["item"]).squeeze(-1).detach().numpy()
        self.scorer.add_views(rows, h["src"].detach().numpy()[rows], h["dst"].detach().numpy()[rows], prior[rows])
        return [item_ids[r] for r in rows.tolist()]


def torch_device(name: str) -> Any:
    from training.train import select_device

    return select_device(name)
