"""Full-graph training of :class:`~training.models.BundleGNN` on basket completion.

Each epoch every training order with two or more items hides one item
(re-drawn per epoch); the rest is the query, the hidden item the positive,
against sampled negatives (softmax cross-entropy). Co-purchase edges are
randomly dropped each step (DropEdge, Rong et al., ICLR 2020) so the model
cannot rely on the very edge it is asked to predict. Early stopping on the
validation queries' NDCG@10. Same code on CPU and CUDA.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch_geometric.utils import scatter
from tqdm import tqdm

from graph.export import CO, IU, UI, to_heterodata
from graph.store import GraphStore
from training.models import BundleGNN
from training.protocol import Queries, evaluate_scores


class TrainConfig(BaseModel):
    """Knobs of GNN training (the ``training:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(128, ge=8)
    layers: int = Field(2, ge=1, le=4)
    dropout: float = Field(0.1, ge=0, lt=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(150, ge=1)
    patience: int = Field(15, ge=1)
    batch_size: int = Field(256, ge=1)
    negatives: int = Field(1024, ge=1)
    drop_edge: float = Field(0.3, ge=0, lt=1)
    user_loss_weight: float = Field(0.2, ge=0)
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$")


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} configured but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def item_features(store: GraphStore, text: np.ndarray) -> torch.Tensor:
    """Text embedding, log(1 + training orders), log(1 + price): all inductive."""
    orders = np.log1p(store.item_order_counts().astype(np.float32)) / 5.0
    price = np.array([it.price or 0.0 for it in store.catalog], np.float32)
    return torch.from_numpy(np.hstack([text, orders[:, None], np.log1p(price)[:, None] / 5.0]).astype(np.float32))


@dataclass
class Graph:
    """A store's edges as tensors on one device, weights normalised per target node."""

    x: torch.Tensor
    num_users: int
    edge_index: dict[tuple[str, str, str], torch.Tensor]
    edge_weight: dict[tuple[str, str, str], torch.Tensor]

    @classmethod
    def build(cls, store: GraphStore, text: np.ndarray, device: torch.device) -> "Graph":
        data = to_heterodata(store)
        index = {rel: data[rel].edge_index.to(device) for rel in (CO, UI, IU)}
        weight = {rel: data[rel].edge_weight.to(device) for rel in (CO, UI, IU)}
        graph = cls(item_features(store, text).to(device), store.num_users, index, weight)
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

    def drop_edges(self, p: float) -> dict[tuple[str, str, str], torch.Tensor]:
        """Normalised weights with a fraction ``p`` of co-purchase edges zeroed."""
        if p == 0:
            return self.edge_weight
        weight = dict(self.edge_weight)
        weight[CO] = weight[CO] * (torch.rand_like(weight[CO]) >= p)
        return self.normalised(weight)

    def embed(self, model: BundleGNN, weight: dict | None = None) -> dict[str, torch.Tensor]:
        return model(self.x, self.num_users, self.edge_index, weight or self.edge_weight)


@torch.no_grad()
def score_queries(model: BundleGNN, graph: Graph, queries: Queries) -> torch.Tensor:
    """``(Q, num_items)`` complement scores of the queries' baskets (on CPU)."""
    model.eval()
    h = graph.embed(model)
    q = queries.matrix(graph.x.size(0)).to(graph.x.device)
    return model.complement_scores(h["item"], q).cpu()


@dataclass
class TrainResult:
    model: BundleGNN
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _baskets(store: GraphStore) -> list[tuple[tuple[int, ...], int]]:
    return [(r.items, r.user) for r in store.orders.values() if r.status == "placed" and len(r.items) >= 2]


def train(store: GraphStore, text: np.ndarray, cfg: TrainConfig, val: Queries | None = None,
          val_graph: Graph | None = None, progress: bool = True) -> TrainResult:
    """Train on ``store``'s orders; early-stop on ``val`` queries when given."""
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    graph = Graph.build(store, text, device)
    val_graph = val_graph or graph
    n = store.num_items
    model = BundleGNN(graph.x.size(1), cfg.hidden, cfg.layers, cfg.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    baskets = _baskets(store)
    if not baskets:
        raise ValueError("no training orders with two or more items")
    rng = np.random.default_rng(cfg.seed)
    best, best_state, best_epoch, bad = -math.inf, copy.deepcopy(model.state_dict()), 0, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit=" epoch", disable=None if progress else True)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(baskets))
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            batch = [baskets[i] for i in order[start : start + cfg.batch_size]]
            hidden = torch.tensor([items[rng.integers(len(items))] for items, _ in batch], device=device)
            q = torch.zeros(len(batch), n, device=device)
            for k, (items, _) in enumerate(batch):
                q[k, list(items)] = 1.0
            q[torch.arange(len(batch)), hidden] = 0.0
            q = q / q.sum(1, keepdim=True)
            cand = torch.unique(torch.cat([hidden, torch.randint(n, (cfg.negatives,), device=device)]))
            target = torch.searchsorted(cand, hidden)
            in_query = q[:, cand] > 0
            h = graph.embed(model, graph.drop_edges(cfg.drop_edge))
            logits = model.complement_scores(h["item"], q, cand).masked_fill(in_query, -torch.inf)
            loss = torch.nn.functional.cross_entropy(logits, target)
            users = torch.tensor([u for _, u in batch], device=device)
            has_user = users >= 0
            if cfg.user_loss_weight and bool(has_user.any()):
                ulogits = model.user_scores(h["user"], h["item"], users[has_user], cand)
                loss = loss + cfg.user_loss_weight * torch.nn.functional.cross_entropy(ulogits, target[has_user])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        row = {"epoch": epoch, "loss": total / len(baskets)}
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
    return TrainResult(model, best_epoch, history)
