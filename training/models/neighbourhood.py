r"""A neighbourhood-restricted closed-form decoder: EASE^R with side information, fitted item by item.

The dense decoder (:func:`~training.models.decoder.decoder_weights`) inverts
the whole :math:`n \times n` Gram matrix: :math:`O(n^3)` time and
:math:`O(n^2)` memory, 32 s at 5k items and out of reach at 50k. EASE^R's
column for item :math:`b` is the ridge regression of :math:`b`'s column of
the basket matrix on every other item's (Steck, WWW 2019). Here each column
is regressed only on :math:`b`'s neighbourhood :math:`N(b)`: its ``k_co``
most co-purchased items plus its ``k_side`` nearest items in each kind of side
information (text, GNN embeddings), as in neighbourhood-restricted SLIM
(Ning & Karypis, "SLIM: Sparse Linear Methods for Top-N Recommender
Systems", ICDM 2011, and its fsSLIM variant):

.. math::
    \mathbf{G} = \mathbf{X}^\top\mathbf{X} + \textstyle\sum_s \alpha_s \mathbf{E}_s\mathbf{E}_s^\top,\qquad
    \mathbf{B}_{N(b),b} = (\mathbf{G}_{N(b)N(b)} + \lambda\mathbf{I})^{-1}\,\mathbf{G}_{N(b)b}

:math:`\mathbf{X}^\top\mathbf{X}` is the graph store's co-purchase counts
(its diagonal: each item's orders), so nothing is built from the orders
again. Each column is a :math:`K \times K` solve (:math:`K \le` ``k_co`` +
sides × ``k_side``), batched: time and memory grow with the items times
:math:`K^2`, not with :math:`n^3`, and :math:`\mathbf{B}` is sparse
(:math:`K` weights per column). The cold-item term of the dense decoder
(:math:`\gamma \max(0, \cos)` towards items without orders) is kept for each
such item's ``k_side`` nearest items by text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from training.neighbours import VectorIndex


def gram(co: sp.csr_matrix, item_counts: np.ndarray) -> sp.csr_matrix:
    """:math:`\\mathbf{X}^\\top\\mathbf{X}` from co-purchase counts (off the diagonal) and item order counts."""
    return (co + sp.diags(item_counts.astype(np.float64))).tocsr()


def _keys(g: sp.csr_matrix) -> np.ndarray:
    """``row · n + column`` of every stored entry: sorted, since rows are and each row's columns are."""
    g.sort_indices()
    rows = np.repeat(np.arange(g.shape[0], dtype=np.int64), np.diff(g.indptr))
    return rows * g.shape[1] + g.indices


def _lookup(g: sp.csr_matrix, keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``g[a, b]`` elementwise (0 where not stored), by binary search of the sorted keys."""
    want = a.astype(np.int64) * g.shape[1] + b
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    return np.where(keys[at] == want, g.data[at], 0.0) if len(keys) else np.zeros(len(want))


def _top_co(g: sp.csr_matrix, k: int) -> list[np.ndarray]:
    """Each item's ``k`` largest off-diagonal entries' columns."""
    out = []
    for b in range(g.shape[0]):
        cols, vals = g.indices[g.indptr[b] : g.indptr[b + 1]], g.data[g.indptr[b] : g.indptr[b + 1]]
        keep = cols != b
        cols, vals = cols[keep], vals[keep]
        if len(cols) > k:
            top = np.argpartition(-vals, k - 1)[:k]
            cols = cols[top]
        out.append(cols.astype(np.int64))
    return out


def nearest(side: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by inner product (approximately), ``-1`` padded: ``(n, k)``."""
    side = np.ascontiguousarray(side, np.float32)
    index = VectorIndex(side.shape[1])
    index.upsert(np.arange(len(side)), side)
    found = index.search_many(side, k + 1)
    out = np.full((len(side), k), -1, np.int64)
    for b in range(len(side)):
        rows = found[b][(found[b] != b) & (found[b] >= 0)][:k]
        out[b, : len(rows)] = rows
    return out


def neighbourhood_weights(g: sp.csr_matrix, sides: Sequence[tuple[str, float, np.ndarray]], lam: float,
                          cold: tuple[float, str] | None = None, k_co: int = 64, k_side: int = 16,
                          chunk: int = 512, near: dict[str, np.ndarray] | None = None) -> sp.csr_matrix:
    r"""The sparse item × item weights :math:`\mathbf{B}` (``a`` row → ``b`` column); a basket ``q`` scores
    items as ``q @ B``.

    ``g``: :func:`gram`; ``sides``: ``(name, α, E)`` with unit rows
    (:func:`~training.models.decoder.side_view`); ``cold``: ``(γ, name)``, the weight of the named side's
    cosine towards items without orders; ``near``: each side's :func:`nearest` by name, filled in when
    missing (a grid of fits over the same sides shares them).
    """
    n = g.shape[0]
    keys = _keys(g)
    counts = g.diagonal()
    near = {} if near is None else near
    for name, alpha, e in sides:
        if name not in near and (alpha or (cold is not None and cold[1] == name)):
            near[name] = nearest(e, k_side)
    active = [(name, alpha, np.asarray(e, np.float64)) for name, alpha, e in sides if alpha]
    co = _top_co(g, k_co)
    rows_out, cols_out, vals_out = [], [], []
    for start in range(0, n, chunk):
        targets = np.arange(start, min(start + chunk, n))
        hoods = []
        for b in targets.tolist():
            parts = [co[b]] + [near[name][b][near[name][b] >= 0] for name, _, _ in active]
            hood = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            hoods.append(hood[hood != b])
        width = max((len(h) for h in hoods), default=0)
        if width == 0:
            continue
        t = len(targets)
        idx = np.zeros((t, width), np.int64)
        mask = np.zeros((t, width), bool)
        for r, hood in enumerate(hoods):
            idx[r, : len(hood)], mask[r, : len(hood)] = hood, True
        # G over each neighbourhood (co-purchases looked up; side information as inner products), and G's column b
        a = np.repeat(idx, width, axis=1).ravel()
        c = np.tile(idx, (1, width)).ravel()
        g_nn = _lookup(g, keys, a, c).reshape(t, width, width)
        g_nb = _lookup(g, keys, idx.ravel(), np.repeat(targets, width)).reshape(t, width)
        for _, alpha, e in active:
            en, eb = e[idx], e[targets]
            g_nn += alpha * np.einsum("tkd,tjd->tkj", en, en)
            g_nb += alpha * np.einsum("tkd,td->tk", en, eb)
        pad = ~mask
        g_nn[pad] = 0.0
        g_nn.transpose(0, 2, 1)[pad] = 0.0
        g_nb[pad] = 0.0
        g_nn += lam * np.eye(width)[None]
        w = torch.linalg.solve(torch.from_numpy(g_nn), torch.from_numpy(g_nb).unsqueeze(-1)).squeeze(-1).numpy()
        rows_out.append(idx[mask])
        cols_out.append(np.repeat(targets, mask.sum(1)))
        vals_out.append(w[mask])
    b_rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
    b_cols = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64)
    b_vals = np.concatenate(vals_out) if vals_out else np.zeros(0)
    if cold is not None and cold[0]:
        gamma = cold[0]
        text = np.asarray(next(e for name, _, e in sides if name == cold[1]), np.float64)
        unsold = np.flatnonzero(counts == 0)
        close = near[cold[1]][unsold]
        ok = close >= 0
        a = close[ok]
        bcol = np.repeat(unsold, ok.sum(1))
        cos = np.einsum("kd,kd->k", text[a], text[bcol])
        b_rows, b_cols = np.concatenate([b_rows, a]), np.concatenate([b_cols, bcol])
        b_vals = np.concatenate([b_vals, gamma * np.maximum(cos, 0.0)])
    weights = sp.coo_matrix((b_vals.astype(np.float32), (b_rows, b_cols)), shape=(n, n)).tocsr()
    weights.sum_duplicates()
    weights.setdiag(0)
    weights.eliminate_zeros()
    return weights
