"""Export a :class:`~graph.store.GraphStore` to a torch-geometric ``HeteroData``.

Node types ``item`` and ``user``; edge types
``(item, co_purchased, item)`` (both directions),
``(user, interacted, item)`` and its reverse ``(item, rev_interacted, user)``.
Every edge type carries ``edge_weight`` (decayed at ``now``) and ``edge_count``.
Node features are not set here: the training package adds text embeddings.

A large shop has hundreds of co-purchase neighbours per item (213 M pairs at
200k items): ``co_per_item`` keeps each item's heaviest incoming edges only
(and ``ui_per_user`` each user's heaviest items), so message passing costs
items × k instead of growing with every pair.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import HeteroData

from graph.store import GraphStore
from graph.tallies import Rows

CO = ("item", "co_purchased", "item")
UI = ("user", "interacted", "item")
IU = ("item", "rev_interacted", "user")


def heaviest(rows: Rows, k: int | None) -> np.ndarray:
    """Which entries are among their row's ``k`` largest weights (all when ``k`` is None)."""
    keep = np.ones(rows.nnz, bool)
    if k is None:
        return keep
    degree = np.diff(rows.indptr)
    for r in np.flatnonzero(degree > k).tolist():
        lo, hi = int(rows.indptr[r]), int(rows.indptr[r + 1])
        drop = np.argpartition(-rows.weight[lo:hi], k - 1)[k:]
        keep[lo + drop] = False
    return keep


def _edges(store: GraphStore, table: str, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(row, column, count, weight)`` of every stored entry kept by :func:`heaviest`, block by block."""
    edges = getattr(store, table)
    edges.compact()
    parts = []
    for b, block in enumerate(edges.blocks):
        keep = heaviest(block, k)
        rows = np.repeat(np.arange(b * edges.block_rows, b * edges.block_rows + block.rows), np.diff(block.indptr))
        parts.append((rows[keep], block.index[keep].astype(np.int64), block.count[keep].astype(np.int64),
                      block.weight[keep].astype(np.float64)))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(c) for c in zip(*parts))  # type: ignore[return-value]


def to_heterodata(store: GraphStore, now: float | None = None, co_per_item: int | None = None,
                  ui_per_user: int | None = None) -> HeteroData:
    """The graph as ``HeteroData`` with decayed edge weights at time ``now``; ``co_per_item``: keep each item's
    heaviest co-purchase edges into it, ``ui_per_user``: each user's heaviest items (None: every edge)."""
    data = HeteroData()
    data["item"].num_nodes = store.num_items
    data["user"].num_nodes = store.num_users
    target, source, cnt, w = _edges(store, "co", co_per_item)  # a row lists its item's neighbours: edges into it
    data[CO].edge_index = torch.from_numpy(np.stack([source, target]))
    data[CO].edge_weight = torch.from_numpy(store.decayed(w, now)).float()
    data[CO].edge_count = torch.from_numpy(cnt)
    u, i, cnt, w = _edges(store, "ui", ui_per_user)
    data[UI].edge_index = torch.from_numpy(np.stack([u, i]))
    data[UI].edge_weight = torch.from_numpy(store.decayed(w, now)).float()
    data[UI].edge_count = torch.from_numpy(cnt)
    data[IU].edge_index = torch.from_numpy(np.stack([i, u]))
    data[IU].edge_weight = data[UI].edge_weight
    data[IU].edge_count = data[UI].edge_count
    return data
