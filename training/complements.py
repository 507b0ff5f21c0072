"""Ranked complements of an item from the live graph and, when loaded, a model's item views.

This is what the stream worker publishes on ``bundle-updates`` and the API
builds bundles from. Sources, always quoted so a ``why`` can be written:

* **decoder** (an artifact's closed-form decoder, see
  :mod:`training.models.decoder`, for items it has a row for): the item's
  top decoder weights ``B_ab``, plus ``decoder_boost × log(1 + decayed
  co-purchase weight)`` so that orders after training still move items up
  (and bring in new pairs) before the next retrain;
* **model** (a trained artifact's item views, see
  :class:`~training.models.BundleGNN`): the asymmetric score
  ``cos(src_a, dst_b) / τ + prior_b``, plus ``co_purchase_boost ×
  log(1 + decayed co-purchase weight)`` so that orders that arrive after
  training move items up before the next retrain;
* **co-purchase** statistics when no model (or no view of the item) exists:
  cosine of order counts ``n_ab / sqrt(n_a n_b)`` (item-kNN, Sarwar et al.
  2001). An item with no orders yet borrows the complements of its most
  similar items by text ("new item: similar text to …").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from datetime import datetime

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from graph.store import GraphStore
from training.neighbours import VectorIndex


class Complement(BaseModel):
    """One candidate complement of an anchor item."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    score: float
    orders: int = Field(description="orders that held both items (not cancelled)")
    model_score: float | None = Field(None, description="the model's score alone, when a model scored it")
    source: str = Field(description="'decoder', 'model', 'co-purchase' or 'similar-text'")
    via: str | None = Field(None, description="for 'similar-text': the known item whose complements were borrowed")


class BundleUpdate(BaseModel):
    """The message on ``bundle-updates``: an item's fresh complement list."""

    item_id: str
    complements: list[Complement]
    model_version: str | None
    graph_version: int
    updated_at: datetime
    source_ts: float | None = Field(None, description="produce time (epoch s) of the newest event that caused it")
    substitutes: list[str] = Field(default_factory=list,
                                   description="near-identical items by text that were never bought with it")
    orders: int | None = Field(None, description="placed orders holding the item (a feature of the bundle "
                                                 "builder's fitted score: serving.bundle_fit)")


def update_signature(secret: bytes, key: bytes, value: bytes) -> bytes:
    """The ``signature`` header of a ``bundle-updates`` record: HMAC-SHA256 of its key and value under the
    worker's and the API's shared ``stream.signing_key`` (a record cannot be forged or moved to another item
    by whoever can write to the topic without the key)."""
    return hmac.new(secret, len(key).to_bytes(4, "big") + key + value, hashlib.sha256).hexdigest().encode()


def signed(secret: bytes, key: bytes | None, value: bytes | None, signature: bytes | None) -> bool:
    """Whether a record carries the signature :func:`update_signature` gives it."""
    if key is None or value is None or signature is None:
        return False
    return hmac.compare_digest(update_signature(secret, key, value), signature)


#: A complement as plain values, in :class:`Complement`'s field order (the scorer's hot path builds no objects).
Ranked = tuple[str, float, int, "float | None", str, "str | None"]
_FIELDS = tuple(Complement.model_fields)
_str = encode_basestring_ascii  # json.dumps of a str, without its per-call overhead


def _finite(ts: float | None) -> float | None:
    return ts if ts is None or math.isfinite(ts) else None


class ScorerConfig(BaseModel):
    """Knobs of complement scoring (the ``scoring:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, le=500, description="complements kept per item")
    co_purchase_boost: float = Field(1.0, ge=0, description="weight of log(1 + co-purchase weight) on model scores")
    decoder_boost: float = Field(0.05, ge=0, description="weight of log(1 + co-purchase weight) on decoder scores")
    similar_items: int = Field(3, ge=0, description="text neighbours a new item borrows complements from")
    min_text_similarity: float = Field(0.5, ge=-1, le=1, description="text cosine from which a new item "
                                       "borrows a similar item's complements")
    substitute_similarity: float = Field(0.85, ge=-1, le=1,
                                         description="text cosine from which two never co-purchased items are substitutes")
    substitute_same_category: bool = Field(True, description="and only when they are in the same category (items "
                                           "without one: text alone); see bench/results/bundles.md for the measure")
    max_substitutes: int = Field(20, ge=0, description="substitutes published per item")


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def model_logits(src: np.ndarray, dst: np.ndarray, prior: np.ndarray, temperature: float) -> np.ndarray:
    """The model's complement score ``s(a → b) = cos(src_a, dst_b) / τ + prior_b`` for unit-length views."""
    return src @ dst.T / temperature + prior


def _top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first; ties keep index order."""
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < len(score):
        part = np.argpartition(-score, k - 1)[:k]
        cut = score[part].min()
        part = np.flatnonzero(score >= cut)  # every tie at the cut, so the stable sort decides as a full sort would
    else:
        part = np.arange(len(score))
    return part[np.argsort(-score[part], kind="stable")][:k]


class ComplementScorer:
    """Scores complements over a :class:`GraphStore` it reads but never changes.

    Every list is built from candidates, never from a scan of the catalog:
    the item's co-purchase neighbours, its decoder row, and its nearest
    items by text or model view from an approximate index
    (:class:`~training.neighbours.VectorIndex`) kept up to date as texts
    and views arrive. So a refresh costs the same at 5k and at 200k items.
    """

    def __init__(self, store: GraphStore, config: ScorerConfig | None = None) -> None:
        self.store = store
        self.config = config or ScorerConfig()
        self.text = np.zeros((0, 0), np.float32)  # rows: store item rows; unit vectors
        self.text_index: VectorIndex | None = None
        self.model_version: str | None = None
        self.temperature = 1.0
        self._src = self._dst = np.zeros((0, 0), np.float32)
        self._prior = np.zeros(0, np.float32)
        self._has_view = np.zeros(0, bool)
        self._views: tuple[dict[str, int], np.ndarray, np.ndarray, np.ndarray] = ({}, self._src, self._dst, self._prior)
        self._view_index: VectorIndex | None = None  # [dst, τ·prior] of items with a view: inner product = τ·score
        self._decoder: tuple[list[str], np.ndarray, np.ndarray] | None = None  # its item ids; rows × top-k: indices, weights
        self._decoder_at: dict[str, int] = {}  # item id → decoder row
        self._store_rows = np.zeros(0, np.int64)  # decoder row → store row, -1 while the store lacks the item
        self._text_neighbours: dict[int, np.ndarray] = {}  # row → rows above substitute_similarity, best first

    # ---- inputs ------------------------------------------------------------
    def _grow(self, array: np.ndarray, width: int, fill: float = 0.0) -> np.ndarray:
        n = self.store.num_items
        if array.shape[0] >= n and (array.ndim == 1 or array.shape[1] == width):
            return array
        shape = (n,) if array.ndim == 1 else (n, width)
        out = np.full(shape, fill, array.dtype)
        if array.size:
            out[: array.shape[0]] = array
        return out

    def set_text(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Text embeddings (L2-normalised) of the given item rows."""
        self.text = self._grow(self.text, vectors.shape[1])
        self.text[rows] = vectors
        if self.text_index is None:
            self.text_index = VectorIndex(vectors.shape[1])
        self.text_index.upsert(rows, vectors)
        self._text_neighbours.clear()

    def set_views(self, version: str, item_ids: list[str], src: np.ndarray, dst: np.ndarray, prior: np.ndarray,
                  temperature: float, decoder: tuple[list[str], np.ndarray, np.ndarray] | None = None) -> None:
        """A model's item views and, if it has one, its decoder rows (replacing any earlier model's).

        Views of ids the store does not know yet are kept and given to those
        items when they arrive (the worker loads a model before it has read
        the catalog). ``decoder``: ``(item ids, indices, weights)`` as in an
        artifact, the indices being rows of its item ids.
        """
        self._decoder = decoder
        self._decoder_at = {k: i for i, k in enumerate(decoder[0])} if decoder is not None else {}
        self._store_rows = np.full(len(self._decoder_at), -1, np.int64)
        self._views = ({k: i for i, k in enumerate(item_ids)}, unit(src).astype(np.float32),
                       unit(dst).astype(np.float32), prior.astype(np.float32))
        self._src, self._dst = np.zeros((0, src.shape[1]), np.float32), np.zeros((0, dst.shape[1]), np.float32)
        self._prior, self._has_view = np.zeros(0, np.float32), np.zeros(0, bool)
        self._view_index = None  # built when first needed: items with a decoder row never search the views
        self.model_version, self.temperature = version, temperature
        self._sync()

    def add_views(self, rows: np.ndarray, src: np.ndarray, dst: np.ndarray, prior: np.ndarray) -> None:
        """Views of items the model had none for (from an inductive pass over the current graph)."""
        self._sync()
        rows = np.asarray(rows, np.int64)
        self._src[rows], self._dst[rows] = unit(src).astype(np.float32), unit(dst).astype(np.float32)
        self._prior[rows], self._has_view[rows] = prior, True
        self._index_views(rows)

    def _index_views(self, rows: np.ndarray) -> None:
        if self._view_index is not None and len(rows):
            self._view_index.upsert(rows, np.hstack([self._dst[rows], self.temperature * self._prior[rows, None]]))

    def _views_index(self) -> VectorIndex:
        """The index of model views (built on first use, then kept up to date)."""
        if self._view_index is None:
            self._view_index = VectorIndex(self._dst.shape[1] + 1)
            self._index_views(np.flatnonzero(self._has_view))
        return self._view_index

    def _sync(self) -> None:
        """Grow the per-item arrays to the store's current item count; new items get their model view if any."""
        old = len(self._has_view)
        if old >= self.store.num_items:
            return
        self._src, self._dst = self._grow(self._src, self._src.shape[1]), self._grow(self._dst, self._dst.shape[1])
        self._prior, self._has_view = self._grow(self._prior, 0), self._grow(self._has_view, 0, False)
        index, src, dst, prior = self._views
        ids = self.store.items.ids
        found = [(r, i) for r in range(old, self.store.num_items) if (i := index.get(ids[r])) is not None]
        if found:
            rows, at = np.array(found).T
            self._src[rows], self._dst[rows], self._prior[rows] = src[at], dst[at], prior[at]
            self._has_view[rows] = True
            self._index_views(rows)
        for r in range(old, self.store.num_items):
            if (j := self._decoder_at.get(ids[r])) is not None:
                self._store_rows[j] = r

    def has_view(self, row: int) -> bool:
        self._sync()
        return row < len(self._has_view) and bool(self._has_view[row])

    def rows_without_view(self) -> np.ndarray:
        """Item rows the model has no view of (yet)."""
        self._sync()
        return np.flatnonzero(~self._has_view[: self.store.num_items])

    # ---- scoring -----------------------------------------------------------
    def similar(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The (approximately) ``k`` items closest to ``row`` by text, best first, and their cosines."""
        if self.text_index is None or row >= len(self.text) or not self.text[row].any():  # no text embedding yet
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, sims = self.text_index.search(self.text[row], k + 1)
        keep = rows != row
        return rows[keep][:k], sims[keep][:k]

    def _cooccurrence(self, row: int) -> list[Ranked]:
        rows, counts, _ = self.store.co_neighbours(row)
        if not len(rows):
            return []
        n = self.store.item_orders.count
        score = counts / np.sqrt(np.maximum(n[row], 1) * np.maximum(n[rows], 1))
        ids = self.store.items.ids
        top = _top(score, self.config.top_k)
        return [(ids[r], s, c, None, "co-purchase", None)
                for r, s, c in zip(rows[top].tolist(), np.round(score[top], 6).tolist(), counts[top].tolist())]

    def _borrowed(self, row: int) -> list[Ranked]:
        """Complements of the items most similar by text (a new item has no orders yet)."""
        cfg = self.config
        if not cfg.similar_items:
            return []
        rows, sims = self.similar(row, 8 * cfg.similar_items)
        ordered = self.store.item_orders.count[rows] > 0  # only items with orders lend complements
        rows, sims = rows[ordered][: cfg.similar_items], sims[ordered][: cfg.similar_items]
        out: dict[str, Ranked] = {}
        for similar, sim in zip(rows.tolist(), sims.tolist()):
            if sim < cfg.min_text_similarity:
                break
            via = self.store.items.ids[similar]
            for item_id, lent, *_ in self._cooccurrence(similar):
                score = round(sim * lent, 6)
                if item_id != self.store.items.ids[row] and (item_id not in out or out[item_id][1] < score):
                    out[item_id] = (item_id, score, 0, None, "similar-text", via)
        return sorted(out.values(), key=lambda c: -c[1])[: cfg.top_k]

    def _ranked_candidates(self, row: int, cand: np.ndarray, base: np.ndarray, source: str, boost: float,
                           co_only: bool) -> list[Ranked]:
        """Top ``top_k`` of candidate rows scored ``base`` plus ``boost × log(1 + co-purchase weight)``;
        ``co_only``: co-purchase neighbours outside ``cand`` enter with a base of 0 (else not at all)."""
        rows, counts, weights = self.store.co_neighbours(row)
        unique, inverse = np.unique(np.concatenate([cand, rows]), return_inverse=True)
        score = np.full(len(unique), -np.inf)
        modelled = np.zeros(len(unique))
        score[inverse[: len(cand)]] = modelled[inverse[: len(cand)]] = base
        at = inverse[len(cand):]
        known = np.isfinite(score[at])
        score[at] = np.where(known, score[at], 0.0 if co_only else -np.inf) + boost * np.log1p(weights)
        counted = np.zeros(len(unique), np.int64)
        counted[at] = counts
        score[unique == row] = -np.inf
        top = _top(score, min(self.config.top_k, int(np.isfinite(score).sum())))
        ids = self.store.items.ids
        return [(ids[b], s, c, m, source, None)
                for b, s, c, m in zip(unique[top].tolist(), np.round(score[top], 6).tolist(), counted[top].tolist(),
                                      np.round(modelled[top], 6).tolist())]

    def _model(self, row: int) -> list[Ranked]:
        """The model's score ``cos(src_a, dst_b) / τ + prior_b`` of its nearest views and the co-purchase
        neighbours (those with a view), plus the co-purchase boost."""
        self._sync()
        near, _ = self._views_index().search(np.append(self._src[row], 1.0), 5 * self.config.top_k)
        rows = self.store.co_neighbours(row)[0]
        cand = np.union1d(near, rows[self._has_view[rows]])
        model = model_logits(self._src[row][None], self._dst[cand], self._prior[cand], self.temperature)[0]
        return self._ranked_candidates(row, cand, model, "model", self.config.co_purchase_boost, co_only=False)

    def _decoded(self, row: int, at: int) -> list[Ranked]:
        """The decoder's row ``at`` (of store row ``row``), with co-purchases since training boosted in."""
        assert self._decoder is not None
        index, weight = self._decoder[1][at], self._decoder[2][at]
        cand = self._store_rows[index]
        keep = (cand >= 0) & (weight > 0)
        cand, weight = cand[keep], weight[keep].astype(np.float64)
        return self._ranked_candidates(row, cand, weight, "decoder", self.config.decoder_boost, co_only=True)

    def _ranked(self, item_id: str) -> list[Ranked]:
        row = self.store.items.get(item_id)
        if row is None:
            return []
        if self.has_view(row):
            at = self._decoder_at.get(item_id)
            return self._model(row) if at is None else self._decoded(row, at)
        return self._cooccurrence(row) or self._borrowed(row)

    def complements(self, item_id: str) -> list[Complement]:
        """The ranked complements of ``item_id`` (empty for an unknown item)."""
        # values computed here are valid by construction: no re-validation
        return [Complement.model_construct(**dict(zip(_FIELDS, c))) for c in self._ranked(item_id)]

    def substitutes(self, item_id: str) -> list[str]:
        """Items whose text is near-identical to ``item_id``'s, in the same category (where both have one) and
        never bought with it.

        Near-identical items that *are* bought together (colour variants a
        retailer stocks side by side) are complements, not substitutes; so are
        near-identical texts in different categories (a tablet and its case).
        """
        row = self.store.items.get(item_id)
        cfg = self.config
        if row is None or not cfg.max_substitutes:
            return []
        if row not in self._text_neighbours:
            rows, sims = self.similar(row, cfg.max_substitutes + 30)
            self._text_neighbours[row] = rows[sims >= cfg.substitute_similarity]
        close, ids = self._text_neighbours[row], self.store.items.ids
        category = self.store.catalog[row].category
        if cfg.substitute_same_category and category is not None and len(close):
            catalog = self.store.catalog
            close = close[[catalog[r].category in (None, category) for r in close.tolist()]]
        unbought = close[~np.isin(close, self.store.co_neighbours(row)[0])] if len(close) else close
        return [ids[r] for r in unbought[: cfg.max_substitutes].tolist()]

    def orders(self, item_id: str) -> int:
        """Placed orders holding the item (0 for an item the store does not know)."""
        row, count = self.store.items.index.get(item_id), self.store.item_orders.count
        return int(count[row]) if row is not None and row < len(count) else 0

    def update(self, item_id: str, source_ts: float | None = None, now: datetime | None = None) -> BundleUpdate:
        """The ``bundle-updates`` message of one item."""
        return BundleUpdate(item_id=item_id, complements=self.complements(item_id), model_version=self.model_version,
                            graph_version=self.store.version, updated_at=now or datetime.now().astimezone(),
                            source_ts=_finite(source_ts), substitutes=self.substitutes(item_id),
                            orders=self.orders(item_id))

    def update_json(self, item_id: str, source_ts: float | None = None, now: datetime | None = None) -> bytes:
        """:meth:`update` serialised, without building its objects: the stream worker's hot path.

        Parses to the same :class:`BundleUpdate` (a test pins that); about half
        the time of ``update(...).model_dump_json()``.
        """
        complements = ",".join(
            f'{{"item_id":{_str(i)},"score":{s!r},"orders":{c},"model_score":{"null" if m is None else repr(m)},'
            f'"source":"{src}","via":{"null" if via is None else _str(via)}}}'
            for i, s, c, m, src, via in self._ranked(item_id))
        ts = _finite(source_ts)
        return (f'{{"item_id":{_str(item_id)},"complements":[{complements}],'
                f'"model_version":{"null" if self.model_version is None else _str(self.model_version)},'
                f'"graph_version":{self.store.version},'
                f'"updated_at":"{(now or datetime.now().astimezone()).isoformat()}",'
                f'"source_ts":{"null" if ts is None else repr(float(ts))},'
                f'"substitutes":{json.dumps(self.substitutes(item_id))},'
                f'"orders":{self.orders(item_id)}}}').encode()
