"""Youshu user → bundle recommendation (the BGCN / CrossCBR split) with the project's model.

Youshu (Chen et al., IJCAI 2019) has users, book lists ("bundles") and books
("items"), ids only; the split of BGCN (Chang et al., SIGIR 2020) and
CrossCBR (Ma et al., KDD 2022) gives training, tuning and test user–bundle
pairs; a test user's bundles are ranked against every bundle but the user's
training ones, Recall@20 and NDCG@20 averaged over test users.

The project's pipeline maps onto it unchanged: bundles are the graph's
items, each user's training bundles one order (so a user is a basket of
bundles, and the co-purchase edges link bundles chosen by one user), and an
item's starting features are the bundle's composition instead of a text
embedding: a truncated SVD of its tf-idf weighted bundle × book matrix. The
GNN (:class:`~training.models.BundleGNN`) trains on that graph, early-stopped
on the tuning pairs; the closed-form decoder, with composition and GNN
embeddings as side information, scores a user's bundles as a basket. Two
more terms, weighted on the tuning pairs: how many of a bundle's books the
user has read (the user–book edges; the user's strongest bundle scaled to 1),
the GNN's own user → bundle score (its user head, trained on the same
graph), which the decoder over a user's bundles cannot give, and the
bundles of *similar users* (:meth:`Youshu.similar_users`): kernel ridge
regression over users whose kernel counts shared bundles and shared books,
the two views of a user that CrossCBR (Ma et al., KDD 2022) aligns. The
decoder is item-based (bundle → bundle) and sees a user's books only through
the read-books count; this term is user-based and lets two users who read
the same books vote for each other's bundles.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import solve
from scipy.sparse.linalg import svds

from graph.events import EARLIEST, ItemUpserted, Order, OrderLine
from graph.store import GraphConfig, GraphStore
from training.protocol import Queries


def _idf(m: sp.spmatrix) -> np.ndarray:
    """Each column's inverse document frequency: log(rows / rows holding it), a column in no row as in one."""
    return np.log(m.shape[0] / np.maximum(np.asarray((m > 0).sum(0)).ravel(), 1))


def _pairs(path: Path, shape: tuple[int, int]) -> sp.csr_matrix:
    with gzip.open(path, "rt") as fh:
        rows = np.loadtxt(fh, dtype=np.int64, ndmin=2)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows[:, 0], rows[:, 1])), shape=shape)


@dataclass
class Youshu:
    """The benchmark's relations as sparse 0/1 matrices."""

    train: sp.csr_matrix  # users × bundles
    tune: sp.csr_matrix
    test: sp.csr_matrix
    user_item: sp.csr_matrix  # users × books
    bundle_item: sp.csr_matrix  # bundles × books

    @classmethod
    def read(cls, folder: str | Path) -> "Youshu":
        folder = Path(folder)
        users, bundles, items = (int(x) for x in (folder / "Youshu_data_size.txt").read_text().split()[:3])
        ub = (users, bundles)
        return cls(_pairs(folder / "user_bundle_train.txt.gz", ub), _pairs(folder / "user_bundle_tune.txt.gz", ub),
                   _pairs(folder / "user_bundle_test.txt.gz", ub), _pairs(folder / "user_item.txt.gz", (users, items)),
                   _pairs(folder / "bundle_item.txt.gz", (bundles, items)))

    @property
    def num_bundles(self) -> int:
        return self.train.shape[1]

    def store(self) -> GraphStore:
        """Bundles as items (store row = bundle id), each user's training bundles as one order."""
        store = GraphStore(GraphConfig(order_window_days=None, max_order_items=10_000))
        store.apply_many([ItemUpserted(ts=EARLIEST, item_id=f"b{b}", title=f"bundle {b}")
                          for b in range(self.num_bundles)])
        x = self.train
        store.apply_many([Order(ts=EARLIEST, order_id=f"u{u}", user_id=f"u{u}",
                                items=[OrderLine(item_id=f"b{b}") for b in x.indices[x.indptr[u]:x.indptr[u + 1]]])
                          for u in range(x.shape[0]) if x.indptr[u + 1] > x.indptr[u]])
        return store

    def features(self, dim: int = 64, seed: int = 0) -> np.ndarray:
        """Each bundle's composition as ``dim`` numbers: the truncated SVD of the tf-idf weighted, row-normalised
        bundle × book matrix (the place text embeddings take in a shop)."""
        m = self.bundle_item.astype(np.float64)
        m = (m @ sp.diags(_idf(m))).tocsr()
        norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
        m = sp.diags(1 / np.maximum(norms, 1e-12)) @ m
        u, s, _ = svds(m, k=dim, random_state=seed)
        return (u * s).astype(np.float32)

    def read_books(self) -> sp.csr_matrix:
        """users × bundles: how many of each bundle's books the user has read, each user's largest scaled to 1
        (on the tuning pairs it ranked better than the share of the bundle read, or that share's cosine form)."""
        count = (self.user_item @ self.bundle_item.T).tocsr().astype(np.float32)
        top = np.maximum(count.max(1).toarray().ravel(), 1e-12)
        return (sp.diags(1 / top) @ count).tocsr().astype(np.float32)

    def user_kernel(self) -> np.ndarray:
        """users × users (float64): the bundles and the books two users share, each weighted by its idf
        (``Y W Yᵀ + R V Rᵀ``; Y: training user × bundle, R: user × book), a rare one counting more."""
        kernel = np.zeros((self.train.shape[0], self.train.shape[0]))
        for m in (self.train.astype(np.float64), self.user_item.astype(np.float64)):
            kernel += (m @ sp.diags(_idf(m)) @ m.T).toarray()
        return kernel

    def similar_users(self, lam: float, kernel: np.ndarray | None = None) -> np.ndarray:
        """users × bundles (float32): ``K (K + λI)⁻¹ Y``, the kernel ridge regression of the training user × bundle
        matrix ``Y`` with the user kernel ``K`` (:meth:`user_kernel`; pass it to try several ``λ`` on one).
        A user's row is a smoothed vote of the users like them: their training bundles weighted by how much
        the regression trusts each. One dense solve over users (8,039 on Youshu: seconds); ``λ`` is chosen on
        the tuning pairs (3,000–6,000 rank best there; without the idf, Recall@20 on the tuning pairs is 0.001
        lower, on the test pairs 0.002)."""
        kernel = self.user_kernel() if kernel is None else kernel
        weights = solve(kernel + lam * np.eye(len(kernel)), self.train.astype(np.float64).toarray(), assume_a="pos")
        return (kernel @ weights).astype(np.float32)

    def queries(self, store: GraphStore, pairs: sp.csr_matrix) -> Queries:
        """One query per (user, bundle) pair of ``pairs`` whose user has training bundles: the user's training
        bundles as the basket, the pair's bundle hidden (for early stopping and tuning)."""
        x, counts = self.train, store.item_order_counts()
        items, hidden, users = [], [], []
        for u, b in zip(*pairs.nonzero()):
            basket = x.indices[x.indptr[u]:x.indptr[u + 1]]
            if len(basket):
                items.append(basket.astype(np.int64))
                hidden.append(b)
                users.append(store.users.get(f"u{u}"))
        hidden_a = np.array(hidden, np.int64)
        return Queries(items, hidden_a, np.array(users, np.int64), counts[hidden_a] == 0)


def ranked_metrics(scores: torch.Tensor, seen: sp.csr_matrix, truth: sp.csr_matrix, k: int = 20,
                   per_user: bool = False) -> dict:
    """Recall@k and NDCG@k of users' score rows (every row of ``scores``; their rows of ``seen`` masked out)
    against their rows of ``truth``, as the CrossCBR code computes them: recall = hits / test bundles, NDCG with
    the ideal DCG of min(test bundles, k) hits; users without test bundles are not counted (``per_user``: each
    counted user's values too)."""
    s = scores.clone()
    r, c = seen.nonzero()
    s[torch.from_numpy(r.astype(np.int64)), torch.from_numpy(c.astype(np.int64))] = -torch.inf
    top = s.topk(k, dim=1).indices.numpy()
    hits = np.take_along_axis(truth.toarray() > 0, top, 1)
    n = np.asarray(truth.sum(1)).ravel()
    keep = n > 0
    discount = 1 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discount).sum(1)
    idcg = np.array([discount[:min(int(x), k)].sum() for x in n])
    recall, ndcg = hits.sum(1)[keep] / n[keep], dcg[keep] / idcg[keep]
    out: dict = {"recall": float(recall.mean()), "ndcg": float(ndcg.mean()), "users": int(keep.sum())}
    if per_user:
        out["per_user"] = {"recall": recall, "ndcg": ndcg}
    return out
