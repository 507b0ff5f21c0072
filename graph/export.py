"""Export a :class:`~graph.store.GraphStore` to a torch-geometric ``HeteroData``.

Node types ``item`` and ``user``; edge types
``(item, co_purchased, item)`` (both directions),
``(user, interacted, item)`` and its reverse ``(item, rev_interacted, user)``.
Every edge type carries ``edge_weight`` (decayed at ``now``) and ``edge_count``.
Node features are not set here: the training package adds text embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import HeteroData

from graph.store import GraphStore

CO = ("item", "co_purchased", "item")
UI = ("user", "interacted", "item")
IU = ("item", "rev_interacted", "user")


def to_heterodata(store: GraphStore, now: float | None = None) -> HeteroData:
    """The graph as ``HeteroData`` with decayed edge weights at time ``now``."""
    data = HeteroData()
    data["item"].num_nodes = store.num_items
    data["user"].num_nodes = store.num_users
    a, b, cnt, w = store.co_edges(now)
    data[CO].edge_index = torch.from_numpy(np.stack([np.concatenate([a, b]), np.concatenate([b, a])]))
    data[CO].edge_weight = torch.from_numpy(np.concatenate([w, w])).float()
    data[CO].edge_count = torch.from_numpy(np.concatenate([cnt, cnt]))
    u, i, cnt, w = store.ui_edges(now)
    data[UI].edge_index = torch.from_numpy(np.stack([u, i]))
    data[UI].edge_weight = torch.from_numpy(w).float()
    data[UI].edge_count = torch.from_numpy(cnt)
    data[IU].edge_index = torch.from_numpy(np.stack([i, u]))
    data[IU].edge_weight = data[UI].edge_weight
    data[IU].edge_count = data[UI].edge_count
    return data
