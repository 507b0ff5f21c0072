"""Classical baselines, each an item×item score matrix over a store's item rows.

A basket query ``q`` (1/|q| on its items) scores every item as ``q @ S + b``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from graph.store import GraphStore
from training.models.decoder import decoder_weights, side_view


def basket_matrix(store: GraphStore) -> sp.csr_matrix:
    """Binary order×item matrix of the placed orders in ``store`` (training stores keep every order)."""
    _, _, indptr, items = store.placed_orders()
    return sp.csr_matrix((np.ones(len(items)), items, indptr), shape=(len(indptr) - 1, store.num_items))


def popularity(store: GraphStore) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank by the number of training orders (the same list for every query)."""
    n = store.num_items
    return torch.zeros(n, n), torch.from_numpy(store.item_order_counts().astype(np.float32))


def cooccurrence(store: GraphStore) -> tuple[torch.Tensor, torch.Tensor]:
    """Item-kNN: cosine similarity of items' order vectors (Sarwar et al., WWW 2001)."""
    x = basket_matrix(store)
    c = (x.T @ x).toarray()
    norm = np.sqrt(np.clip(np.diag(c), 1e-9, None))
    s = c / norm[:, None] / norm[None, :]
    np.fill_diagonal(s, 0.0)
    return torch.from_numpy(s.astype(np.float32)), torch.zeros(store.num_items)


def ease(store: GraphStore, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EASE^R (Steck, WWW 2019): closed-form item–item regression with a zero diagonal."""
    x = basket_matrix(store)
    g = (x.T @ x).toarray() + lam * np.eye(store.num_items)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return torch.from_numpy(b.astype(np.float32)), torch.zeros(store.num_items)


def text_ease(store: GraphStore, text: np.ndarray, lam: float, alpha: float,
              cold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EASE^R with the text embeddings as side information (collective EASE, Jeunen et al., RecSys 2020):
    the GNN's decoder without the GNN (``cold``: its text weight towards items without orders)."""
    view = side_view(text)
    return decoder_weights(basket_matrix(store), [(alpha, view)], lam, cold=(cold, view)), torch.zeros(store.num_items)


def text_similarity(embeddings: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of text embeddings (rows L2-normalised)."""
    e = torch.from_numpy(embeddings)
    s = e @ e.T
    s.fill_diagonal_(0.0)
    return s, torch.zeros(len(e))
