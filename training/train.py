"""Training of :class:`~training.models.BundleGNN` on basket completion, and the model it serves.

Every training order with two or more items gives one example per item:
that item hidden, the rest the query, the hidden item the positive against
sampled negatives (softmax cross-entropy). An epoch draws up to
``examples_per_epoch`` of them; one forward serves ``batch_size``: over the
full graph where a full-graph step fits in memory, else over a sampled
neighbourhood of the batch (:mod:`training.sampling`; ``gnn_steps``).
Baskets are sparse rows and logits cover only the positives and the sampled
negatives, so nothing in a step has the size of batch × catalog. Message
passing uses each item's ``co_edges_per_item`` heaviest co-purchase edges
(sparse CSR products: no pyg-lib needed on the CPU); co-purchase edges are
randomly dropped each step (DropEdge, Rong et al., ICLR 2020) so the model
cannot rely on the very edge it is asked to predict. Early stopping on the
validation queries' NDCG@10. Same code on CPU and CUDA.

The model a shop is served then scores through a closed-form decoder
(:mod:`training.models.decoder`): item–item weights fitted on the training
orders with the text and GNN item embeddings as side information, exactly
(dense) up to ``decoder_dense_max_items`` items and neighbourhood-restricted
(sparse) above. A query with a known user adds ``user_weight`` times the
user's own history (recency-weighted purchases, scaled to at most 1) and
``head_weight`` times the GNN's own user → item score (:class:`UserHead`). λ,
the side weights and both user weights are picked on the validation queries.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch_geometric.utils import scatter
from tqdm import tqdm

from graph.export import CO, IU, UI, to_heterodata
from graph.store import GraphStore
from training.baselines import item_gram
from training.models import Adjacency, BundleGNN, Decoder, DecoderConfig, fit_decoders, side_view
from training.protocol import Queries, ScoreFn, dense, rank_many, rank_queries
from training.sampling import NeighbourSample, cumulative_weights, sample_neighbourhood

log = logging.getLogger(__name__)

# A full-graph step's memory (:func:`full_step_gb`): about ten tensors of 4-byte floats kept per node, channel
# and layer, and per edge of the three relations the step's weights, masks and CSR values and their
# sparse-product buffers. Close to the measured step at 200 k items (7.45 GB estimated, 7.01 GB measured:
# bench/results/gnn_steps.md) and below it for small shops, whose steps are far from any budget.
STEP_BYTES_PER_NODE_CHANNEL = 40.0
STEP_BYTES_PER_EDGE = 100.0


class TrainConfig(BaseModel):
    """Knobs of GNN training and of the decoder (the ``training:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(128, ge=8, description="size of the GNN's node embeddings")
    layers: int = Field(2, ge=1, le=4, description="message-passing layers")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on embeddings while training")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-5, ge=0, description="AdamW weight decay")
    epochs: int = Field(60, ge=1, description="most GNN epochs")
    patience: int = Field(8, ge=1, description="epochs without a better validation NDCG@10 before stopping")
    gnn_budget_s: float | None = Field(600.0, gt=0, description="seconds the GNN epochs may take: after the epoch "
                                       "that passes it training keeps the best epoch so far (a retraining job has "
                                       "a time slot; null: no limit)")
    early_stop_queries: int = Field(2000, ge=1, description="validation queries (a seeded sample) ranked after "
                                    "each epoch for early stopping")
    batch_size: int = Field(2048, ge=1, description="examples per training step")
    gnn_steps: Literal["auto", "full", "sampled"] = Field(
        "auto", description="full-graph training steps, or steps on a sampled neighbourhood of the batch "
        "(training.sampling); auto: sampled when a full-graph step's estimated memory passes gnn_memory_gb")
    gnn_memory_gb: float | None = Field(None, gt=0, description="memory a full-graph step may take before auto "
                                        "switches to sampled steps (null: a quarter of the machine's memory, "
                                        "and on a GPU no more than half of the GPU's)")
    fanouts: list[int] | None = Field(None, description="sampled steps: neighbours drawn per node, relation and "
                                      "layer, one entry per layer, the batch's own layer first (null: 10 per layer)")
    examples_per_epoch: int = Field(20_000, ge=1, description="(basket, hidden item) pairs drawn per epoch")
    negatives: int = Field(4096, ge=1, description="sampled negatives; all items when the catalog is smaller")
    drop_edge: float = Field(0.3, ge=0, lt=1, description="share of co-purchase edges dropped in each step "
                             "(DropEdge)")
    co_edges_per_item: int | None = Field(32, ge=1, description="message passing keeps each item's heaviest "
                                          "co-purchase edges (null: all of them)")
    ui_edges_per_user: int | None = Field(128, ge=1, description="and each user's heaviest items")
    id_embeddings: bool = Field(True, description="learned per-item ID embeddings for items with orders")
    cold_share: float = Field(0.2, ge=0, lt=1, description="share of items made to look new in each step")
    temperature: float = Field(0.1, gt=0, description="τ of the GNN's cosine scores")
    user_loss_weight: float = Field(0.2, ge=0, description="weight of the user → item loss beside the basket "
                                    "completion loss")
    seed: int = Field(0, description="seed of sampling and initialisation (training is deterministic)")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="auto: CUDA when available")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast of the scoring heads (auto: on GPUs with bf16, fp32 elsewhere)")
    decoder: bool = Field(True, description="score through the closed-form decoder (else the GNN's cosine head)")
    decoder_lambdas: list[float] = Field([10.0, 25.0, 50.0], min_length=1, description="ridge λ grid")
    decoder_text_weights: list[float] = Field([30.0, 100.0], min_length=1, description="text side-information grid")
    decoder_gnn_weights: list[float] = Field([0.0, 10.0, 50.0], min_length=1,
                                             description="GNN-embedding side-information grid")
    decoder_dense_max_items: int = Field(
        12_000, ge=2, description="catalogs up to this size get the exact dense decoder, larger ones the "
                                 "neighbourhood fit (bench/results/decoder.md measures both)")
    decoder_k_co: int = Field(64, ge=1, description="neighbourhood fit: co-purchase partners per item (highest cosine)")
    decoder_k_side: int = Field(16, ge=1, description="neighbourhood fit: nearest items per kind of side information")
    decoder_tune_queries: int = Field(20_000, ge=1, description="validation queries (a seeded sample) the decoder "
                                      "grid and the user weight are tuned on: ranking is per query and catalog item")
    decoder_top_k: int = Field(200, ge=1, description="complements per item the artifact keeps from the decoder")
    pair_folds: int = Field(1, ge=1, description="time folds the bundle builder's pair model is fitted on: 1, the "
                            "validation orders; each more trains one more model (a training each) on the events "
                            "before the previous fold's validation orders and adds its own validation orders "
                            "(serving.bundle_fit.fit_candidate)")
    decoder_cold_weight: float = Field(0.03, ge=0, description="text cosine towards items without orders (fixed, "
                                       "not tuned: validation holds too few such items)")
    user_weights: list[float] = Field([0.0, 0.05, 0.2, 0.5], min_length=1,
                                      description="grid of the weight of a known user's own history")
    head_weights: list[float] = Field([0.0, 0.05, 0.15, 0.5], min_length=1,
                                      description="grid of the weight of the GNN's user → item score for a known "
                                      "user, in units of the spread of the decoder's scores of the query")

    @model_validator(mode="after")
    def _fanout_per_layer(self) -> "TrainConfig":
        if self.fanouts is not None and (len(self.fanouts) != self.layers or min(self.fanouts) < 1):
            raise ValueError(f"training.fanouts needs one positive entry per layer ({self.layers}), got {self.fanouts}")
        return self

    @property
    def layer_fanouts(self) -> list[int]:
        return self.fanouts if self.fanouts is not None else [10] * self.layers

    def decoder_method(self, num_items: int) -> Literal["dense", "neighbourhood"]:
        return "dense" if num_items <= self.decoder_dense_max_items else "neighbourhood"

    def decoder_grid(self, num_items: int) -> list[DecoderConfig]:
        """Every (λ, text, GNN) point, fitted by the method the catalog's size calls for."""
        common = {"cold_weight": self.decoder_cold_weight, "method": self.decoder_method(num_items),
                  "k_co": self.decoder_k_co, "k_side": self.decoder_k_side}
        return [DecoderConfig(lam=lam, text_weight=t, gnn_weight=g, **common)
                for lam in self.decoder_lambdas for t in self.decoder_text_weights for g in self.decoder_gnn_weights]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision where it is safe: bf16 for the dense scoring matmuls (batch × candidates × hidden),
    the largest products of a step. Message passing stays fp32: its sparse products have no bf16 kernels
    on every device, and sums over hundreds of neighbours lose digits in bf16. Softmax and loss run in
    fp32 under autocast's own rules."""
    if precision == "auto":
        use = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} configured but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Fixed seeds and deterministic kernels.

    Seeds alone are not enough: multi-threaded CPU kernels summed floats in a
    varying order, so two runs of one seed drifted apart in the 7th digit and
    early stopping then picked other epochs (Online Retail II seed 2: best
    epoch 6 in one run, 19 in another). Deterministic kernels cost no
    measurable time here; where an op has none, torch warns instead of failing.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic matmuls
    torch.use_deterministic_algorithms(True, warn_only=True)


def item_features(store: GraphStore, text: np.ndarray) -> torch.Tensor:
    """Text embedding and log(1 + price), centred over the catalog.

    Sentence embeddings of shop titles share a large common direction; centring
    removes it so items differ in the cosine scores. No order counts: every
    training positive has one, so the model would learn that new items never sell.
    """
    price = np.log1p(np.array([it.price or 0.0 for it in store.catalog], np.float32))
    x = np.hstack([text, price[:, None] / 5.0]).astype(np.float32)
    return torch.from_numpy(x - x.mean(0, keepdims=True))


def user_history(store: GraphStore) -> sp.csr_matrix:
    """users × items: each user's recency-weighted purchases and interactions, scaled to at most 1 per user."""
    r = store.user_item_matrix().tocsr()
    top = np.maximum(r.max(axis=1).toarray().ravel(), 1e-12)
    return (sp.diags(1.0 / top) @ r).tocsr().astype(np.float32)


@dataclass
class Graph:
    """A store's edges as tensors on one device, weights normalised per target node, and what the decoder and
    the user term read."""

    x: torch.Tensor
    num_users: int
    edge_index: dict[tuple[str, str, str], torch.Tensor]
    edge_weight: dict[tuple[str, str, str], torch.Tensor]
    id_index: torch.Tensor  # row of each item in the model's ID table, -1 for none
    store: GraphStore  # read for the decoder's Gram matrix and the user term, when first asked

    @classmethod
    def build(cls, store: GraphStore, text: np.ndarray, device: torch.device, id_items: list[str] | None = None,
              co_per_item: int | None = 32, ui_per_user: int | None = 128) -> "Graph":
        """``id_items``: the item ids of the model's ID table (default: items with orders in ``store``)."""
        data = to_heterodata(store, co_per_item=co_per_item, ui_per_user=ui_per_user)
        index = {rel: data[rel].edge_index.to(device) for rel in (CO, UI, IU)}
        weight = {rel: data[rel].edge_weight.to(device) for rel in (CO, UI, IU)}
        table = {k: r for r, k in enumerate(id_items if id_items is not None else id_table(store))}
        ids = torch.tensor([table.get(k, -1) for k in store.items.ids], dtype=torch.long, device=device)
        graph = cls(item_features(store, text).to(device), store.num_users, index, weight, ids, store)
        graph.edge_weight = graph.normalised(weight)
        return graph

    @cached_property
    def gram(self) -> sp.csr_matrix:
        """XᵀX of the placed orders, for the decoder."""
        return item_gram(self.store)

    @cached_property
    def history(self) -> sp.csr_matrix:
        """users × items, for the user term (:func:`user_history`)."""
        return user_history(self.store)

    @property
    def num_items(self) -> int:
        return self.x.size(0)

    def normalised(self, weight: dict[tuple[str, str, str], torch.Tensor]) -> dict[tuple[str, str, str], torch.Tensor]:
        sizes = {"item": self.x.size(0), "user": self.num_users}
        out = {}
        for rel, w in weight.items():
            dst = self.edge_index[rel][1]
            total = scatter(w, dst, 0, dim_size=sizes[rel[2]], reduce="sum")
            out[rel] = w / total[dst].clamp(min=1e-12)
        return out

    @cached_property
    def adjacency(self) -> dict[tuple[str, str, str], Adjacency]:
        """Each relation's CSR structure, computed once (training steps change only the weights)."""
        sizes = {"item": self.x.size(0), "user": self.num_users}
        return {rel: Adjacency(index, sizes[rel[2]], sizes[rel[0]]) for rel, index in self.edge_index.items()}

    @cached_property
    def cumulative_weights(self) -> dict[tuple[str, str, str], torch.Tensor]:
        """Each relation's weights summed along its CSR order, for drawing neighbours (computed once)."""
        return {rel: cumulative_weights(adj, self.edge_weight[rel]) for rel, adj in self.adjacency.items()}

    def embed(self, model: BundleGNN, weight: dict | None = None, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        weight = weight or self.edge_weight
        adj_t = {rel: structure(weight[rel]) for rel, structure in self.adjacency.items()}
        return model(self.x, adj_t, self.id_index if ids is None else ids)

    def sampled(self, items: torch.Tensor, users: torch.Tensor, fanouts: list[int]) -> tuple["Graph", NeighbourSample]:
        """The subgraph of a sampled computation graph for the seed ``items`` and ``users``
        (:func:`~training.sampling.sample_neighbourhood`): its nodes, their sampled in-edges with the
        weights normalised again over them, and how parent ids map to its rows."""
        picked = sample_neighbourhood(self.adjacency, self.cumulative_weights, self.edge_weight, items, users,
                                      fanouts, self.num_items, self.num_users)
        index = {}
        for rel, ids in picked.edges.items():
            src, dst = self.edge_index[rel][:, ids]
            index[rel] = torch.stack([picked.local(rel[0], src), picked.local(rel[2], dst)])
        sub = Graph(self.x[picked.items], len(picked.users), index, picked.weights, self.id_index[picked.items],
                    self.store)
        sub.edge_weight = sub.normalised(picked.weights)
        return sub, picked

    def training_view(self, drop_edge: float, cold: float) -> tuple[dict, torch.Tensor]:
        """Edge weights and ID rows for one training step.

        A share ``drop_edge`` of co-purchase edges is dropped (DropEdge). A share
        ``cold`` of items is made to look new: no ID embedding and no edges at
        all, so the model learns to score items from text alone (DropoutNet,
        Volkovs et al., NeurIPS 2017).
        """
        weight = dict(self.edge_weight)
        cold_items = torch.rand(self.x.size(0), device=self.x.device) < cold
        co = self.edge_index[CO]
        keep = ~(cold_items[co[0]] | cold_items[co[1]])
        if drop_edge:
            keep &= torch.rand(co.size(1), device=co.device) >= drop_edge
        weight[CO] = weight[CO] * keep
        weight[UI] = weight[UI] * ~cold_items[self.edge_index[UI][1]]
        weight[IU] = weight[IU] * ~cold_items[self.edge_index[IU][0]]
        return self.normalised(weight), self.id_index.masked_fill(cold_items, -1)

    def add_user_scores(self, scores: torch.Tensor, users: np.ndarray, weight: float) -> torch.Tensor:
        """``scores`` (``(len(users), n)``) plus ``weight`` times each known user's scaled history (unknown
        users: -1), in place: the history is sparse, a dense copy of it would be as large as the scores."""
        known = np.flatnonzero(users >= 0)
        if len(known):
            h = self.history[users[known]].tocoo()
            rows, cols = torch.from_numpy(known[h.row]), torch.from_numpy(h.col.astype(np.int64))
            scores.index_put_((rows, cols), torch.from_numpy(weight * h.data).to(scores.dtype), accumulate=True)
        return scores


def id_table(store: GraphStore) -> list[str]:
    """Items that get a learned ID embedding: those in at least one placed order."""
    counts = store.item_order_counts()
    return [k for k, c in zip(store.items.ids, counts) if c > 0]


def sparse_rows(q: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse COO tensor on ``device``."""
    coo = q.tocoo()
    index = torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(index, torch.from_numpy(coo.data.astype(np.float32)), coo.shape,
                                   check_invariants=False).to(device)  # indices from scipy: in range


@torch.no_grad()
def head_scores(model: BundleGNN, graph: Graph, h: dict[str, torch.Tensor] | None = None) -> ScoreFn:
    """The GNN's own cosine head as a scorer of queries over ``graph``'s items."""
    h = h if h is not None else graph.embed(model.eval())
    device = graph.x.device
    return lambda q, a, b: model.complement_scores(h, sparse_rows(q.csr(graph.num_items, a, b), device)).cpu()


def side_views(model: BundleGNN, graph: Graph, h_item: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """The decoder's side information: text (the item features without price) and the GNN's item embeddings."""
    if h_item is None:
        with torch.no_grad():
            h_item = graph.embed(model.eval())["item"]
    return [("text", side_view(graph.x[:, :-1].cpu())), ("gnn", side_view(h_item.cpu()))]


def decoders_for(cfgs: list[DecoderConfig], graph: Graph, views: list[tuple[str, torch.Tensor]],
                 near: dict[str, np.ndarray] | None = None) -> Iterator[Decoder]:
    """The decoders ``cfgs`` over ``graph``'s orders with the given side views (a neighbourhood grid in one pass)."""
    return fit_decoders(graph.gram, views, cfgs, "cpu", near)


def decoder_for(cfg: DecoderConfig, graph: Graph, views: list[tuple[str, torch.Tensor]],
                near: dict[str, np.ndarray] | None = None) -> Decoder:
    """The decoder ``cfg`` over ``graph``'s orders with the given side views."""
    return next(decoders_for([cfg], graph, views, near))


@dataclass
class UserHead:
    """The GNN's own user → item score (:meth:`BundleGNN.user_scores`) as a term of the pipeline for queries
    with a known user. It gives what neither the decoder over the basket nor the user's own history can: items
    the user never bought that users like them did (the user–item edges, through message passing), as the
    GNN's user → bundle term does on Youshu (``bench/youshu.py``). Each user's scores are standardised over
    the catalog and scaled by the spread (standard deviation) of the scores they are added to, so one weight
    grid fits decoders of any scale."""

    model: BundleGNN
    h: dict[str, torch.Tensor]  # :meth:`Graph.embed` of the graph whose users the queries name
    _last: tuple[bytes, torch.Tensor] | None = field(default=None, repr=False)  # the last users' standardised scores

    @classmethod
    def of(cls, model: BundleGNN, graph: Graph) -> "UserHead":
        with torch.no_grad():
            return cls(model, graph.embed(model.eval()))

    @torch.no_grad()
    def add(self, scores: torch.Tensor, users: np.ndarray, weight: float) -> torch.Tensor:
        """``scores`` (``(len(users), n)``) plus ``weight`` × spread × each known user's standardised head
        scores (unknown users: -1), in place."""
        known = np.flatnonzero(users >= 0)
        if not len(known) or not weight:
            return scores
        rows = torch.from_numpy(known)
        scores[rows] += weight * scores[rows].std(1, keepdim=True) * self._standardised(users[known])
        return scores

    def _standardised(self, users: np.ndarray) -> torch.Tensor:
        """Each user's head scores over the catalog, standardised; the last users' are kept, so the weights of
        a grid ranked chunk by chunk (:func:`tune_weight`) compute them once a chunk."""
        key = users.tobytes()
        if self._last is None or self._last[0] != key:
            head = self.model.user_scores(self.h, torch.from_numpy(users).to(self.h["user"].device)).float().cpu()
            self._last = (key, (head - head.mean(1, keepdim=True)) / head.std(1, keepdim=True).clamp_min(1e-12))
        return self._last[1]


def pipeline_scores(base: ScoreFn | Decoder, graph: Graph, user_weight: float = 0.0, head: UserHead | None = None,
                    head_weight: float = 0.0) -> ScoreFn:
    """A decoder's (or another scorer's) scores plus ``head_weight`` times the GNN's user head (scaled by
    those scores' spread, :class:`UserHead`) plus ``user_weight`` times the query's user's history."""
    score = decoder_scores(base, graph.num_items) if isinstance(base, Decoder) else base
    head_weight = head_weight if head is not None else 0.0
    if not user_weight and not head_weight:
        return score

    def scored(q: Queries, a: int, b: int) -> torch.Tensor:
        out, users = dense(score(q, a, b)).float().clone(), q.users[a:b]
        if head_weight:
            head.add(out, users, head_weight)
        return graph.add_user_scores(out, users, user_weight) if user_weight else out

    return scored


def decoder_scores(decoder: Decoder, num_items: int) -> ScoreFn:
    """A decoder's scores of the queries' baskets (a neighbourhood decoder's rows stay sparse: see
    :func:`training.protocol.sparse_ranks`)."""
    if sp.issparse(decoder.weights):
        return lambda q, a, b: decoder.sparse_scores(q.csr(num_items, a, b))
    return lambda q, a, b: decoder.scores(q.csr(num_items, a, b))


def last_chunk(score: ScoreFn) -> ScoreFn:
    """``score`` that keeps its last answer: the scorers of a weight grid built on it and ranked chunk by
    chunk (:func:`training.protocol.rank_many`) compute it once a chunk. Its callers must not change the
    answer in place (:func:`pipeline_scores` copies it)."""
    last: list = [None, None, None, None]  # the queries (matched by identity), a, b, the answer

    def scored(q: Queries, a: int, b: int) -> torch.Tensor | sp.csr_matrix:
        if last[0] is not q or last[1:3] != [a, b]:
            last[:] = [q, a, b, score(q, a, b)]
        return last[3]

    return scored


def score_queries(model: BundleGNN, graph: Graph, queries: Queries, decoder: DecoderConfig | Decoder | None = None,
                  user_weight: float = 0.0) -> torch.Tensor:
    """``(Q, num_items)`` scores of the queries (small catalogs and tests: everything at once): through the
    decoder (a config is fitted over ``graph`` first), or the cosine head when there is none."""
    if isinstance(decoder, DecoderConfig):
        decoder = decoder_for(decoder, graph, side_views(model, graph))
    base = decoder if decoder is not None else head_scores(model, graph)
    return dense(pipeline_scores(base, graph, user_weight)(queries, 0, len(queries)))


def ndcg(score: ScoreFn, queries: Queries, num_items: int) -> float:
    return rank_queries(score, queries, num_items, top=False).metrics(num_items)["ndcg@10"]


def tune_decoder(model: BundleGNN, graph: Graph, val: Queries, cfg: TrainConfig,
                 h_item: torch.Tensor | None = None) -> tuple[dict[DecoderConfig, float], Decoder]:
    """Validation NDCG@10 of every point of the decoder grid (neighbourhood fits: all in one pass), and the best
    fitted decoder (ties: the first grid point). ``h_item``: the model's item embeddings over ``graph``, when
    already computed."""
    grid = cfg.decoder_grid(graph.num_items)
    seen: dict[DecoderConfig, float] = {}
    best: Decoder | None = None
    for d in tqdm(decoders_for(grid, graph, side_views(model, graph, h_item)), total=len(grid), desc="decoder",
                  leave=False, disable=None):
        seen[d.config] = ndcg(pipeline_scores(d, graph), val, graph.num_items)
        if best is None or seen[d.config] > seen[best.config]:
            best = d
    assert best is not None  # the grid is never empty (its lists have min_length 1)
    return seen, best


def sample(queries: Queries, at_most: int, seed: list[int]) -> Queries:
    """``queries``, or a seeded sample of ``at_most`` of them in their order."""
    if len(queries) <= at_most:
        return queries
    return queries.subset(np.sort(np.random.default_rng(seed).choice(len(queries), at_most, False)))


def tune_weight(make: Callable[[float], ScoreFn], grid: list[float], val: Queries, num_items: int,
                without: float | None = None) -> dict[float, float]:
    """Validation NDCG@10 of ``make(w)`` for each weight ``w`` of a user term (queries without a user are
    unaffected), all weights ranked in one pass over the queries (parts they share, :func:`last_chunk` and
    :class:`UserHead`'s scores, are computed once a chunk); ``without``: the score at weight 0, when already
    measured (it is not ranked again)."""
    if not (val.users >= 0).any():
        return {0.0: float("nan")}
    todo = [w for w in grid if not (w == 0 and without is not None)]
    ranked = dict(zip(todo, rank_many([make(w) for w in todo], val, num_items, top=False)))
    return {w: without if w not in ranked else ranked[w].metrics(num_items)["ndcg@10"] for w in grid}


def best_weight(val: dict[float, float]) -> float:
    """The weight with the best validation score (ties: the smaller)."""
    return max(val, key=lambda w: (val[w], -w))


class Phases:
    """Seconds each phase of a job took and the process's peak RSS (GB) when it ended, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str, **counts: int) -> None:
        import resource

        now = time.perf_counter()
        self.seconds[f"{name}_s"] = round(now - self._last, 1)
        self.seconds[f"{name}_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        self.seconds.update({f"{name}_{k}": v for k, v in counts.items()})
        self._last = now


@dataclass
class FitLists:
    """The model's item views and its chosen decoder's top rows over the training store's item rows: what
    the scorer needs to publish the lists this model would, before the validation orders (the bundle
    builder's pair model is fitted on those: ``serving.bundle_fit``)."""

    src: np.ndarray
    dst: np.ndarray
    prior: np.ndarray
    index: np.ndarray
    weight: np.ndarray


@dataclass
class TrainResult:
    model: BundleGNN
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    decoder: DecoderConfig | None = None  # None: score with the cosine head
    decoder_val: dict[DecoderConfig, float] = field(default_factory=dict)  # the grid's validation NDCG@10
    user_weight: float = 0.0
    user_val: dict[float, float] = field(default_factory=dict)
    head_weight: float = 0.0  # of the GNN's user head (:class:`UserHead`)
    gnn_steps: str = "full"  # full-graph or sampled training steps (:func:`step_kind`)
    head_val: dict[float, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds and peak RSS (GB) per phase
    fit_lists: FitLists | None = None  # what the model publishes over the training store (set with a decoder)

    @property
    def gnn_weight(self) -> float:
        """The weight validation gave the GNN's embeddings in the decoder (0: the GNN plays no part in it)."""
        return self.decoder.gnn_weight if self.decoder is not None else 1.0

    @property
    def gnn_used(self) -> bool:
        """Whether the pipeline's scores read the GNN: in the decoder, or through its user head (which evaluation
        and the promotion window score, and the API does not serve yet)."""
        return bool(self.gnn_weight or self.head_weight)


def _baskets(store: GraphStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training baskets of two or more items as ``(indptr, items, users)``. An example is a (basket, hidden
    position) pair, named by its flat position in ``items``: no table of the examples is built (at 200 k
    items it would hold 34 M pairs, 1 GB more at the peak)."""
    _, users, indptr, items = store.placed_orders()
    sizes = np.diff(indptr)
    keep = sizes >= 2
    sizes = sizes[keep]
    return np.concatenate([[0], np.cumsum(sizes)]), items[np.repeat(keep, np.diff(indptr))], users[keep]


def _batch(indptr: np.ndarray, items: np.ndarray, batch: np.ndarray,
           n: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The batch's queries (each basket without its hidden item, 1/|query| on its items), hidden items and
    baskets, for ``batch``: flat positions in ``items`` (:func:`_baskets`)."""
    baskets = np.searchsorted(indptr, batch, side="right") - 1
    starts, sizes = indptr[baskets], indptr[baskets + 1] - indptr[baskets]
    rows = np.repeat(np.arange(len(batch)), sizes - 1)
    # each basket's flat positions except the hidden one
    flat = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes - starts, sizes)
    rest = flat[flat != np.repeat(batch, sizes)]
    q = sp.csr_matrix((np.repeat(1.0 / (sizes - 1), sizes - 1), (rows, items[rest])), shape=(len(batch), n))
    return q, items[batch], baskets


def full_step_gb(graph: Graph, cfg: TrainConfig) -> float:
    """Estimated peak memory of one full-graph training step: every node's activations of every layer kept
    for the backward pass, and each relation's weights, masks and CSR copies for the step (constants: see
    :data:`STEP_BYTES_PER_EDGE`)."""
    nodes = graph.num_items + graph.num_users
    edges = sum(int(index.size(1)) for index in graph.edge_index.values())
    return (STEP_BYTES_PER_NODE_CHANNEL * nodes * cfg.hidden * cfg.layers + STEP_BYTES_PER_EDGE * edges) / 1e9


def step_memory_gb(device: torch.device) -> float:
    """What a full-graph step may take by default: a quarter of the machine's memory, and where the step runs
    on a GPU no more than half of the GPU's (the graph and the model sit there too)."""
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4e9
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory / 2e9)
    return budget


def step_kind(graph: Graph, cfg: TrainConfig) -> Literal["full", "sampled"]:
    """``cfg.gnn_steps``, with auto decided by :func:`full_step_gb` against ``cfg.gnn_memory_gb``."""
    if cfg.gnn_steps != "auto":
        return cfg.gnn_steps
    budget = cfg.gnn_memory_gb if cfg.gnn_memory_gb is not None else step_memory_gb(graph.x.device)
    estimate = full_step_gb(graph, cfg)
    kind: Literal["full", "sampled"] = "sampled" if estimate > budget else "full"
    log.info("GNN steps: %s (a full-graph step takes about %.2f GB, training.gnn_memory_gb allows %.1f)", kind,
             estimate, budget)
    return kind


def _loss(model: BundleGNN, graph: Graph, cfg: TrainConfig, indptr: np.ndarray, items: np.ndarray,
          users: np.ndarray, batch: np.ndarray, negatives: torch.Tensor, sampled: bool) -> torch.Tensor:
    """The training loss of one batch of examples (flat positions, :func:`_baskets`): softmax cross-entropy
    of each hidden item against the ``negatives`` and the batch's other answers, plus the user → item loss; on
    the full graph, or on the batch's sampled subgraph (:meth:`Graph.sampled`) when ``sampled``."""
    device = graph.x.device
    q_csr, hidden_np, baskets = _batch(indptr, items, batch, graph.num_items)
    hidden = torch.from_numpy(hidden_np).to(device)
    # the batch's answers are candidates too: an item the catalog updated after the last order can be one
    cand = torch.unique(torch.cat([hidden, negatives]))
    target = torch.searchsorted(cand, hidden)
    # a query's own items among the candidates are not answers
    qc = q_csr.tocoo()
    cand_np = cand.cpu().numpy()
    at = np.minimum(np.searchsorted(cand_np, qc.col), len(cand_np) - 1)
    hit = cand_np[at] == qc.col
    in_query = torch.zeros(len(batch), len(cand_np), dtype=torch.bool)
    in_query[torch.from_numpy(qc.row[hit].astype(np.int64)), torch.from_numpy(at[hit].astype(np.int64))] = True
    in_query = in_query.to(device)
    batch_users = torch.from_numpy(users[baskets]).to(device)
    has_user = batch_users >= 0
    step_users = batch_users[has_user] if cfg.user_loss_weight else batch_users[:0]
    q = sparse_rows(q_csr, device)
    view = graph
    if sampled:  # the same step on the subgraph that computes what the loss reads, in its own rows
        query_items = torch.from_numpy(q_csr.indices.astype(np.int64)).to(device)
        view, picked = graph.sampled(torch.cat([query_items, cand]), step_users, cfg.layer_fanouts)
        cols = picked.local("item", query_items).cpu().numpy()
        q = sparse_rows(sp.csr_matrix((q_csr.data, cols, q_csr.indptr), shape=(len(batch), view.num_items)), device)
        cand, step_users = picked.local("item", cand), picked.local("user", step_users)
    h = view.embed(model, *view.training_view(cfg.drop_edge, cfg.cold_share))
    with autocast(cfg.precision, device):
        logits = model.complement_scores(h, q, cand).masked_fill(in_query, -torch.inf)
        loss = torch.nn.functional.cross_entropy(logits, target)
        if cfg.user_loss_weight and len(step_users):
            ulogits = model.user_scores(h, step_users, cand)
            loss = loss + cfg.user_loss_weight * torch.nn.functional.cross_entropy(ulogits, target[has_user])
    return loss


def train(store: GraphStore, text: np.ndarray, cfg: TrainConfig, val: Queries | None = None,
          val_graph: Graph | None = None, progress: bool = True) -> TrainResult:
    """Train on ``store``'s orders; early-stop on ``val`` queries when given; tune the decoder and user weight."""
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    phases = Phases()
    graph = Graph.build(store, text, device, co_per_item=cfg.co_edges_per_item, ui_per_user=cfg.ui_edges_per_user)
    phases.done("graph")
    val_graph = val_graph or graph
    n = store.num_items
    num_ids = int((graph.id_index >= 0).sum()) if cfg.id_embeddings else 0
    model = BundleGNN(graph.x.size(1), cfg.hidden, cfg.layers, cfg.dropout, num_ids, cfg.temperature).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    indptr, items, users = _baskets(store)
    if not len(items):
        raise ValueError("no training orders with two or more items")
    # Items the catalog lists only after the last training event are never positives;
    # as negatives they would teach the model that new items never sell.
    last_order = float(store.placed_orders()[0].max())
    known = torch.tensor([it.updated <= last_order for it in store.catalog], device=device)
    known_rows = known.nonzero().squeeze(1)
    rng = np.random.default_rng(cfg.seed)
    sampled = step_kind(graph, cfg) == "sampled"
    stop_on = None
    if val is not None and len(val):
        stop_on = sample(val, cfg.early_stop_queries, [cfg.seed, 2])
    best, best_state, best_epoch, bad = -math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit=" epoch", disable=None if progress else True)
    began, over_budget = time.perf_counter(), False
    for epoch in bar:
        model.train()
        epoch_examples = rng.permutation(len(items))[: cfg.examples_per_epoch]
        total = 0.0
        for start in range(0, len(epoch_examples), cfg.batch_size):
            batch = epoch_examples[start : start + cfg.batch_size]
            negatives = known_rows if cfg.negatives >= len(known_rows) else \
                known_rows[torch.randint(len(known_rows), (cfg.negatives,), device=device)]
            opt.zero_grad()
            loss = _loss(model, graph, cfg, indptr, items, users, batch, negatives, sampled)
            loss.backward()
            total += float(loss.detach()) * len(batch)
            opt.step()
        row = {"epoch": epoch, "loss": total / len(epoch_examples)}
        if stop_on is not None:
            model.eval()
            metrics = rank_queries(head_scores(model, val_graph), stop_on, n).metrics(n)
            row.update({f"val_{k}": v for k, v in metrics.items() if k in ("hr@10", "ndcg@10")})
            if row["val_ndcg@10"] > best:
                best, best_state, best_epoch, bad = row["val_ndcg@10"], copy.deepcopy(model.state_dict()), epoch, 0
            else:
                bad += 1
        else:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if bad >= cfg.patience:
            break
        if cfg.gnn_budget_s is not None and time.perf_counter() - began > cfg.gnn_budget_s and epoch < cfg.epochs:
            over_budget = True
            log.warning("GNN epochs stopped after %d of at most %d: they took %.0f s, over training.gnn_budget_s="
                        "%g; the best epoch so far (%d) is kept", epoch, cfg.epochs, time.perf_counter() - began,
                        cfg.gnn_budget_s, best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    phases.done("gnn_epochs", epochs=len(history), stopped_by_budget=int(over_budget), sampled=int(sampled))
    result = TrainResult(model, best_epoch, history, phases=phases.seconds, gnn_steps="sampled" if sampled else "full")
    if not cfg.decoder:
        return result
    if val is not None and len(val):
        val = sample(val, cfg.decoder_tune_queries, [cfg.seed, 3])
        head = UserHead.of(model, val_graph)  # one pass over the graph for the decoder's views and the user head
        result.decoder_val, chosen = tune_decoder(model, val_graph, val, cfg, head.h["item"])
        result.decoder = chosen.config
        phases.done("decoder_tuning", fits=len(result.decoder_val))
        chosen_scores = last_chunk(decoder_scores(chosen, n))
        result.user_val = tune_weight(lambda w: pipeline_scores(chosen_scores, val_graph, w), cfg.user_weights, val,
                                      n, result.decoder_val[result.decoder])
        result.user_weight = best_weight(result.user_val)
        result.head_val = tune_weight(lambda w: pipeline_scores(chosen_scores, val_graph, result.user_weight, head, w),
                                      cfg.head_weights, val, n, result.user_val[result.user_weight])
        result.head_weight = best_weight(result.head_val)
        with torch.no_grad():
            prior = model.prior(head.h["item"]).squeeze(-1)
        result.fit_lists = FitLists(head.h["src"].cpu().numpy(), head.h["dst"].cpu().numpy(), prior.cpu().numpy(),
                                    *chosen.top_rows(cfg.decoder_top_k))
        phases.done("user_weight")
    else:
        result.decoder = cfg.decoder_grid(n)[0]
    if not result.gnn_used:
        log.warning("validation gave the GNN weight 0 in the decoder and in the user term: this model scores with "
                    "the co-purchase counts, text and users' histories alone (the GNN still gives views to items the "
                    "decoder has no row for)")
    elif result.decoder.gnn_weight == 0:
        log.info("validation gave the GNN's embeddings weight 0 in the decoder; it plays its part through its "
                 "user head (weight %g)", result.head_weight)
    return result
