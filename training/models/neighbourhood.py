r"""A neighbourhood-restricted closed-form decoder: EASE^R with side information, fitted item by item.

The dense decoder (:func:`~training.models.decoder.decoder_weights`) inverts
the whole :math:`n \times n` Gram matrix: :math:`O(n^3)` time and
:math:`O(n^2)` memory, 32 s at 5k items and out of reach at 50k. EASE^R's
column for item :math:`b` is the ridge regression of :math:`b`'s column of
the basket matrix on every other item's (Steck, WWW 2019). Here each column
is regressed only on :math:`b`'s neighbourhood :math:`N(b)`: its ``k_co``
partners of highest co-purchase cosine plus its ``k_side`` nearest items in
each kind of side information (text, GNN embeddings), as in
neighbourhood-restricted SLIM (Ning & Karypis, "SLIM: Sparse Linear Methods
for Top-N Recommender Systems", ICDM 2011, and its fsSLIM variant):

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

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from graph.tallies import THREADS, on_threads
from training.neighbours import VectorIndex


def _top_co(g: sp.csr_matrix, k: int) -> np.ndarray:
    r"""Each item's ``k`` off-diagonal partners of highest co-purchase cosine
    :math:`G_{ab} / \sqrt{G_{aa} G_{bb}}`, ``-1`` padded: ``(n, k)``.

    By raw counts every neighbourhood fills up with the shop's best-sellers; the cosine keeps the partners an
    item goes with more than its popularity says. On Online Retail II full (``bench/decoder.py``'s split,
    seed 0, text side information, 64 partners) it lifts the fit from 0.975 to 0.984 of the dense inversion's
    HR@10 (NDCG@10 0.979 → 0.987) at the same cost.
    """
    out = np.full((g.shape[0], k), -1, np.int64)
    scale = 1.0 / np.sqrt(np.maximum(g.diagonal(), 1e-12))  # the row's own factor ranks nothing: left out
    for b in range(g.shape[0]):
        cols, vals = g.indices[g.indptr[b] : g.indptr[b + 1]], g.data[g.indptr[b] : g.indptr[b + 1]]
        keep = cols != b
        cols, vals = cols[keep], vals[keep] * scale[cols[keep]]
        if len(cols) > k:
            cols = cols[np.argpartition(-vals, k - 1)[:k]]
        out[b, : len(cols)] = cols
    return out


class _Lookup:
    """``g[a, b]`` elementwise for a symmetric ``g`` with sorted indices, fast where it is slow in CSR.

    scipy's ``g[a, b]`` scans each pair's row from its start unless the pairs
    outnumber a tenth of the stored values (then it first checks the whole
    matrix's order), and most of a neighbourhood's pairs are pairs of popular
    items with long rows. So the ``dense`` most connected items' block is held
    dense (pairs of them are read directly), and every other pair is found by
    a binary search in the shorter of its two rows, vectorised over the pairs
    (all pairs step together; those found drop out), in parts on threads
    (numpy releases the GIL). 4.5× scipy's speed on the pairs of 40 copies of
    Online Retail II full's Gram (199k items, 2.2 M pairs a chunk).
    """

    def __init__(self, g: sp.csr_matrix, dense: int = 4096) -> None:
        if not g.has_sorted_indices:
            raise ValueError("_Lookup needs a CSR matrix with sorted indices")
        self.g, self.row_len = g, np.diff(g.indptr)
        top = np.argsort(-self.row_len, kind="stable")[: min(dense, g.shape[0])]
        self.slot = np.full(g.shape[0], -1, np.int64)
        self.slot[top] = np.arange(len(top))
        self.block = g[top][:, top].toarray()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        sa, sb = self.slot[a], self.slot[b]
        both = (sa >= 0) & (sb >= 0)
        out = np.empty(len(a))
        out[both] = self.block[sa[both], sb[both]]
        a, b = a[~both], b[~both]
        swap = self.row_len[a] > self.row_len[b]
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        if len(a):
            cuts = np.linspace(0, len(a), THREADS + 1).astype(np.int64).tolist()
            spans = [slice(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]
            out[~both] = np.concatenate(on_threads(lambda s: self._search(a[s], b[s]), spans, "lookup"))
        return out

    def _search(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``g[a, b]``: the lower bound of ``b`` in row ``a``'s columns, every pair a step at a time."""
        indices, g = self.g.indices, self.g
        end = g.indptr[a + 1].astype(np.int64)
        lo, hi = g.indptr[a].astype(np.int64), end.copy()
        target = b.astype(indices.dtype)
        live = np.flatnonzero(lo < hi)
        while len(live):
            l, h = lo[live], hi[live]
            mid = (l + h) >> 1
            right = indices[mid] < target[live]
            lo[live], hi[live] = np.where(right, mid + 1, l), np.where(right, h, mid)
            live = live[lo[live] < hi[live]]
        out = np.zeros(len(a))
        found = lo < end
        found[found] = indices[lo[found]] == target[found]
        out[found] = g.data[lo[found]]
        return out


def _hoods(targets: np.ndarray, candidates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each target's neighbourhood: the union of its candidate rows without itself, ``(index, mask)``, both
    ``(len(targets), width)``, valid entries first."""
    cand = np.concatenate(candidates, 1) if candidates else np.full((len(targets), 0), -1, np.int64)
    cand = np.where(cand == targets[:, None], -1, cand)
    cand.sort(axis=1)
    cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # duplicates (sorted: next to each other)
    valid = cand >= 0
    order = np.argsort(~valid, axis=1, kind="stable")
    idx, mask = np.take_along_axis(cand, order, 1), np.take_along_axis(valid, order, 1)
    width = int(mask.sum(1).max()) if len(mask) else 0
    idx, mask = idx[:, :width], mask[:, :width]
    return np.where(mask, idx, 0), mask


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


def neighbourhood_fits(g: sp.csr_matrix, sides: Sequence[tuple[str, np.ndarray]],
                      points: Sequence[tuple[float, dict[str, float]]], cold: tuple[float, str] | None = None,
                      k_co: int = 64, k_side: int = 16, chunk: int = 512,
                      near: dict[str, np.ndarray] | None = None) -> Iterator[sp.csr_matrix]:
    r"""The sparse item × item weights :math:`\mathbf{B}` (``a`` row → ``b`` column) of each point
    ``(λ, {side name: α})`` of a grid, in one pass; a basket ``q`` scores items as ``q @ B``.

    The solves run when the first matrix is asked for; each point's matrix is assembled only when it is
    asked for, and its values (float32) are freed then, so a grid holds the values of every point but at most
    the matrices its caller keeps (tuning keeps the best: two at a time), not one matrix per point.

    ``g``: :math:`\mathbf{X}^\top\mathbf{X}` (:func:`training.baselines.item_gram`); ``sides``: ``(name, E)``
    with unit rows (:func:`~training.models.decoder.side_view`);
    ``cold``: ``(γ, name)``, the weight of the named side's cosine towards items without orders; ``near``:
    each side's :func:`nearest` by name, filled in when missing. Every item's neighbourhood is its ``k_co``
    partners of highest co-purchase cosine (:func:`_top_co`) and its ``k_side`` nearest in *every* side
    given, weighted or not, so all points share the neighbourhoods, the co-purchase Gram blocks and the side
    products, and a point fitted alone equals the same point fitted in a grid. Only the K × K solves are per
    point.
    """
    n = g.shape[0]
    g = g.tocsr()
    g.sum_duplicates()  # sorted indices, one value per pair: what _Lookup's binary search needs
    counts = g.diagonal()
    near = {} if near is None else near
    for name, e in sides:
        if name not in near:
            near[name] = nearest(e, k_side)
    views = {name: torch.from_numpy(np.asarray(e, np.float64)) for name, e in sides}
    top = _top_co(g, k_co)
    lookup = _Lookup(g)
    rows_out, cols_out = [], []
    vals_out: list[list[np.ndarray]] = [[] for _ in points]
    for start in range(0, n, chunk):
        targets = np.arange(start, min(start + chunk, n))
        idx, mask = _hoods(targets, [top[targets]] + [near[name][targets] for name, _ in sides])
        t, width = idx.shape
        if width == 0:
            continue
        # G over each neighbourhood: co-purchase counts looked up once per unordered pair (G is symmetric)
        iu, ju = np.triu_indices(width, 1)
        pair = mask[:, iu] & mask[:, ju]
        upper = np.zeros((t, len(iu)))
        upper[pair] = lookup(idx[:, iu][pair], idx[:, ju][pair])
        g_co = np.zeros((t, width, width))
        g_co[:, iu, ju] = upper
        g_co[:, ju, iu] = upper
        # the padding's diagonal is 1 (with a zero right-hand side, it solves to 0)
        g_co[:, np.arange(width), np.arange(width)] = np.where(mask, counts[idx], 1.0)
        b_co = np.where(mask, lookup(idx.ravel(), np.repeat(targets, width)).reshape(t, width), 0)
        base, b_co = torch.from_numpy(g_co), torch.from_numpy(b_co)
        side_nn, side_nb = {}, {}
        m = torch.from_numpy(mask).to(torch.float64)
        for name, e in views.items():  # inner products, zero on the padding
            en = e[torch.from_numpy(idx)] * m[..., None]
            side_nn[name] = en @ en.transpose(1, 2)
            side_nb[name] = (en @ e[torch.from_numpy(targets)][..., None]).squeeze(-1)
        g_nn, g_nb = torch.empty_like(base), torch.empty_like(b_co)  # every point fills the same buffers
        for p, (lam, alphas) in enumerate(points):
            g_nn.copy_(base)
            g_nb.copy_(b_co)
            for name, alpha in alphas.items():
                if alpha:
                    g_nn.add_(side_nn[name], alpha=alpha)
                    g_nb.add_(side_nb[name], alpha=alpha)
            g_nn.diagonal(dim1=1, dim2=2).add_(m * lam)
            vals_out[p].append(torch.linalg.solve(g_nn, g_nb.unsqueeze(-1)).squeeze(-1).numpy()[mask]
                               .astype(np.float32))
        rows_out.append(idx[mask].astype(np.int32))
        cols_out.append(np.repeat(targets, mask.sum(1)).astype(np.int32))
    b_rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int32)
    b_cols = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int32)
    del rows_out, cols_out
    if cold is not None and cold[0]:  # γ max(0, cos) towards each unsold item from its nearest items by text
        text = views[cold[1]].numpy()
        unsold = np.flatnonzero(counts == 0)
        close = near[cold[1]][unsold]
        ok = close >= 0
        cold_rows, cold_cols = close[ok].astype(np.int32), np.repeat(unsold, ok.sum(1)).astype(np.int32)
        cold_vals = cold[0] * np.maximum(np.einsum("kd,kd->k", text[cold_rows], text[cold_cols]), 0.0)
    else:
        cold_rows = cold_cols = np.zeros(0, np.int32)
        cold_vals = np.zeros(0)
    rows, cols = np.concatenate([b_rows, cold_rows]), np.concatenate([b_cols, cold_cols])
    del b_rows, b_cols
    for p in range(len(points)):
        v = np.concatenate(vals_out[p] + [cold_vals.astype(np.float32)])
        vals_out[p] = []  # this point's values are in its matrix now
        weights = sp.coo_matrix((v, (rows, cols)), shape=(n, n)).tocsr()  # sums duplicates
        del v
        weights.setdiag(0)
        weights.eliminate_zeros()
        yield weights


def neighbourhood_weights(g: sp.csr_matrix, sides: Sequence[tuple[str, float, np.ndarray]], lam: float,
                          cold: tuple[float, str] | None = None, k_co: int = 64, k_side: int = 16,
                          chunk: int = 512, near: dict[str, np.ndarray] | None = None) -> sp.csr_matrix:
    """One point of :func:`neighbourhood_fits`: ``sides`` as ``(name, α, E)``."""
    return next(neighbourhood_fits(g, [(name, e) for name, _, e in sides], [(lam, {name: a for name, a, _ in sides})],
                                   cold, k_co, k_side, chunk, near))
