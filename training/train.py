"""Full-graph training of :class:`~training.models.BundleGNN` on basket completion.

Every training order with two or more items gives one example per item:
that item hidden, the rest the query, the hidden item the positive against
sampled negatives (softmax cross-entropy). An epoch draws up to
``examples_per_epoch`` of them; one full-graph forward serves ``batch_size``. Co-purchase edges are
randomly dropped each step (DropEdge, Rong et al., ICLR 2020) so the model
cannot rely on the very edge it is asked to predict. Early stopping on the
validation queries' NDCG@10. Same code on CPU and CUDA.

The trained GNN then scores through a closed-form decoder
(:mod:`training.models.decoder`): item–item weights fitted on the training
orders with the text and GNN item embeddings as side information. Its ridge
λ and side weights are picked on the same validation queries from a small
grid (``decoder_*`` settings); ``decoder: false`` scores with the GNN's own
cosine head instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch_geometric.utils import scatter
from tqdm import tqdm

from graph.export import CO, IU, UI, to_heterodata
from graph.store import GraphStore
from training.baselines import basket_matrix
from training.models import BundleGNN, DecoderConfig, decoder_weights, side_view
from training.protocol import Queries, evaluate_scores


log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Knobs of GNN training (the ``training:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1, le=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(60, ge=1)
    patience: int = Field(8, ge=1)
    batch_size: int = Field(2048, ge=1, description="examples per full-graph step")
    examples_per_epoch: int = Field(20_000, ge=1, description="(basket, hidden item) pairs drawn per epoch")
    negatives: int = Field(4096, ge=1, description="sampled negatives; all items when the catalog is smaller")
    drop_edge: float = Field(0.3, ge=0, lt=1)
    id_embeddings: bool = True
    cold_share: float = Field(0.2, ge=0, lt=1, description="share of items made to look new in each step")
    temperature: float = Field(0.1, gt=0)
    user_loss_weight: float = Field(0.2, ge=0)
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast of the scoring heads (auto: on GPUs with bf16, fp32 elsewhere)")
    decoder: bool = Field(True, description="score through the closed-form decoder (else the GNN's cosine head)")
    decoder_lambdas: list[float] = Field([10.0, 25.0, 50.0], min_length=1, description="ridge λ grid")
    decoder_text_weights: list[float] = Field([30.0, 100.0], min_length=1, description="text side-information grid")
    decoder_gnn_weights: list[float] = Field([0.0, 10.0, 50.0], min_length=1,
                                             description="GNN-embedding side-information grid")
    decoder_max_items: int = Field(10_000, ge=2, description="larger catalogs use the cosine head (O(n^3) fit)")
    decoder_top_k: int = Field(200, ge=1, description="complements per item the artifact keeps from the decoder")
    decoder_cold_weight: float = Field(0.03, ge=0, description="text cosine towards items without orders (fixed, "
                                       "not tuned: validation holds too few such items)")

    def decoder_grid(self) -> list[DecoderConfig]:
        return [DecoderConfig(lam=lam, text_weight=t, gnn_weight=g, cold_weight=self.decoder_cold_weight)
                for lam in self.decoder_lambdas
                for t in self.decoder_text_weights for g in self.decoder_gnn_weights]


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


@dataclass
class Graph:
    """A store's edges as tensors on one device, weights normalised per target node."""

    x: torch.Tensor
    num_users: int
    edge_index: dict[tuple[str, str, str], torch.Tensor]
    edge_weight: dict[tuple[str, str, str], torch.Tensor]
    id_index: torch.Tensor  # row of each item in the model's ID table, -1 for none
    baskets: sp.csr_matrix  # placed orders × items, for the decoder

    @classmethod
    def build(cls, store: GraphStore, text: np.ndarray, device: torch.device,
              id_items: list[str] | None = None) -> "Graph":
        """``id_items``: the item ids of the model's ID table (default: items with orders in ``store``)."""
        data = to_heterodata(store)
        index = {rel: data[rel].edge_index.to(device) for rel in (CO, UI, IU)}
        weight = {rel: data[rel].edge_weight.to(device) for rel in (CO, UI, IU)}
        table = {k: r for r, k in enumerate(id_items if id_items is not None else id_table(store))}
        ids = torch.tensor([table.get(k, -1) for k in store.items.ids], dtype=torch.long, device=device)
        graph = cls(item_features(store, text).to(device), store.num_users, index, weight, ids, basket_matrix(store))
        graph.edge_weight = graph.normalised(weight)
        return graph

    def normalised(self, weight: dict[tuple[str, str, str], torch.Tensor]) -> dict[tuple[str, str, str], torch.Tensor]:
        sizes = {"item": self.x.size(0), "user": self.num_users}
        out = {}
        for rel, w in weight.items():
            dst = self.edge_index[rel][1]
            total = scatter(w, dst, 0, dim_size=sizes[rel[2]], reduce="sum")
            out[rel] = w / total[dst].clamp(min=1e-12)
        return out

    def embed(self, model: BundleGNN, weight: dict | None = None, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return model(self.x, self.num_users, self.edge_index, weight or self.edge_weight,
                     self.id_index if ids is None else ids)

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


def id_table(store: GraphStore) -> list[str]:
    """Items that get a learned ID embedding: those in at least one placed order."""
    counts = store.item_order_counts()
    return [k for k, c in zip(store.items.ids, counts) if c > 0]


@torch.no_grad()
def decoder_matrix(model: BundleGNN, graph: Graph, cfg: DecoderConfig, h_item: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's item × item weights over ``graph``, with the model's item embeddings as side information."""
    if h_item is None:
        h_item = graph.embed(model.eval())["item"]
    text = side_view(graph.x[:, :-1])
    sides = [(cfg.text_weight, text), (cfg.gnn_weight, side_view(h_item))]
    return decoder_weights(graph.baskets, sides, cfg.lam, graph.x.device, cold=(cfg.cold_weight, text))


@torch.no_grad()
def score_queries(model: BundleGNN, graph: Graph, queries: Queries, decoder: DecoderConfig | None = None) -> torch.Tensor:
    """``(Q, num_items)`` complement scores of the queries' baskets (on CPU): through ``decoder``
    when given, else the GNN's cosine head."""
    model.eval()
    q = queries.matrix(graph.x.size(0)).to(graph.x.device)
    if decoder is not None:
        return (q @ decoder_matrix(model, graph, decoder)).cpu()
    return model.complement_scores(graph.embed(model), q).cpu()


def tune_decoder(model: BundleGNN, graph: Graph, val: Queries, cfg: TrainConfig) -> dict[DecoderConfig, float]:
    """Validation NDCG@10 of every point of the decoder grid."""
    model.eval()
    h_item = graph.embed(model)["item"]
    q = val.matrix(graph.x.size(0)).to(graph.x.device)
    n = graph.x.size(0)
    return {d: evaluate_scores((q @ decoder_matrix(model, graph, d, h_item)).cpu(), val, n)["ndcg@10"]
            for d in tqdm(cfg.decoder_grid(), desc="decoder", leave=False, disable=None)}


@dataclass
class TrainResult:
    model: BundleGNN
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    decoder: DecoderConfig | None = None  # None: score with the cosine head
    decoder_val: dict[DecoderConfig, float] = field(default_factory=dict)  # the grid's validation NDCG@10


def _baskets(store: GraphStore) -> list[tuple[tuple[int, ...], int]]:
    _, users, indptr, items = store.placed_orders()
    rows = items.tolist()
    return [(tuple(rows[a:b]), u) for a, b, u in zip(indptr[:-1].tolist(), indptr[1:].tolist(), users.tolist())
            if b - a >= 2]


def train(store: GraphStore, text: np.ndarray, cfg: TrainConfig, val: Queries | None = None,
          val_graph: Graph | None = None, progress: bool = True) -> TrainResult:
    """Train on ``store``'s orders; early-stop on ``val`` queries when given."""
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    graph = Graph.build(store, text, device)
    val_graph = val_graph or graph
    n = store.num_items
    num_ids = int((graph.id_index >= 0).sum()) if cfg.id_embeddings else 0
    model = BundleGNN(graph.x.size(1), cfg.hidden, cfg.layers, cfg.dropout, num_ids, cfg.temperature).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    baskets = _baskets(store)
    if not baskets:
        raise ValueError("no training orders with two or more items")
    # every (basket, hidden item) pair is one example
    examples = np.array([(b, pos) for b, (items, _) in enumerate(baskets) for pos in range(len(items))], np.int64)
    # Items the catalog lists only after the last training event are never positives;
    # as negatives they would teach the model that new items never sell.
    last_order = float(store.placed_orders()[0].max())
    known = torch.tensor([it.updated <= last_order for it in store.catalog], device=device)
    known_rows = known.nonzero().squeeze(1)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, best_epoch, bad = -math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit=" epoch", disable=None if progress else True)
    for epoch in bar:
        model.train()
        epoch_examples = examples[rng.permutation(len(examples))[: cfg.examples_per_epoch]]
        total = 0.0
        for start in range(0, len(epoch_examples), cfg.batch_size):
            batch = epoch_examples[start : start + cfg.batch_size]
            hidden = torch.tensor([baskets[b][0][pos] for b, pos in batch], device=device)
            rows = [(k, i) for k, (b, pos) in enumerate(batch) for j, i in enumerate(baskets[b][0]) if j != pos]
            q = torch.zeros(len(batch), n, device=device)
            q[tuple(torch.tensor(rows, device=device).T)] = 1.0
            q = q / q.sum(1, keepdim=True)
            if cfg.negatives >= len(known_rows):
                cand = known_rows
            else:
                sampled = known_rows[torch.randint(len(known_rows), (cfg.negatives,), device=device)]
                cand = torch.unique(torch.cat([hidden, sampled]))
            target = torch.searchsorted(cand, hidden)
            in_query = q[:, cand] > 0
            h = graph.embed(model, *graph.training_view(cfg.drop_edge, cfg.cold_share))
            users = torch.tensor([baskets[b][1] for b, _ in batch], device=device)
            has_user = users >= 0
            with autocast(cfg.precision, device):
                logits = model.complement_scores(h, q, cand).masked_fill(in_query, -torch.inf)
                loss = torch.nn.functional.cross_entropy(logits, target)
                if cfg.user_loss_weight and bool(has_user.any()):
                    ulogits = model.user_scores(h, users[has_user], cand)
                    loss = loss + cfg.user_loss_weight * torch.nn.functional.cross_entropy(ulogits, target[has_user])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        row = {"epoch": epoch, "loss": total / len(epoch_examples)}
        if val is not None and len(val):
            row.update({f"val_{k}": v for k, v in evaluate_scores(score_queries(model, val_graph, val), val, n).items()
                        if k in ("hr@10", "ndcg@10")})
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
    model.load_state_dict(best_state)
    model.eval()
    result = TrainResult(model, best_epoch, history)
    if cfg.decoder and n > cfg.decoder_max_items:
        log.warning("%d items exceed decoder_max_items=%d: scoring with the GNN's cosine head", n, cfg.decoder_max_items)
    elif cfg.decoder:
        if val is not None and len(val):
            result.decoder_val = tune_decoder(model, val_graph, val, cfg)
            result.decoder = max(result.decoder_val, key=result.decoder_val.get)  # ties: the first grid point
        else:
            result.decoder = cfg.decoder_grid()[0]
    return result
