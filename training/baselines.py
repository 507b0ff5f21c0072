"""Classical baselines, each a scorer of basket queries over a store's item rows.

A scorer (:data:`~training.protocol.ScoreFn`) gives every item a score for a
chunk of queries, so evaluation never holds a queries × items matrix of a
large catalog at once. A query's basket ``q`` has 1/|q| on its items.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from graph.store import GraphStore
from training.models.decoder import decoder_weights, side_view
from training.protocol import Queries, ScoreFn

#: EASE^R inverts an n × n matrix: 10k items took 178 s and 3.5 GB on 2 cores; larger catalogs skip it.
EASE_MAX_ITEMS = 12_000


def basket_matrix(store: GraphStore) -> sp.csr_matrix:
    """Binary order × item matrix of the placed orders in ``store`` (training stores keep every order)."""
    _, _, indptr, items = store.placed_orders()
    return sp.csr_matrix((np.ones(len(items)), items, indptr), shape=(len(indptr) - 1, store.num_items))


def item_gram(store: GraphStore) -> sp.csr_matrix:
    """XᵀX of the store's placed orders: co-purchase counts off the diagonal, each item's orders on it."""
    return store.co_purchase_matrix(counts=True, diagonal=store.item_order_counts())


def _dense(m: sp.spmatrix | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(m.toarray() if sp.issparse(m) else m, np.float32))


def popularity(store: GraphStore) -> ScoreFn:
    """Rank by the number of training orders (the same list for every query)."""
    counts = torch.from_numpy(store.item_order_counts().astype(np.float32))
    return lambda q, a, b: counts.expand(b - a, -1).clone()


def cooccurrence(store: GraphStore) -> ScoreFn:
    """Item-kNN: cosine similarity of items' order vectors (Sarwar et al., WWW 2001), as a sparse matrix."""
    co = store.co_purchase_matrix(counts=True)
    norm = 1 / np.sqrt(np.maximum(store.item_order_counts(), 1).astype(np.float64))
    s = (sp.diags(norm) @ co @ sp.diags(norm)).tocsr()
    n = store.num_items
    return lambda q, a, b: _dense(q.csr(n, a, b) @ s)


def ease(store: GraphStore, lam: float) -> ScoreFn:
    """EASE^R (Steck, WWW 2019): closed-form item–item regression with a zero diagonal (dense: small catalogs)."""
    weights = decoder_weights(item_gram(store), [], lam)
    n = store.num_items
    return lambda q, a, b: _dense(q.csr(n, a, b)) @ weights


def text_similarity(embeddings: np.ndarray) -> ScoreFn:
    """Cosine of the basket's mean text embedding with every item's (rows L2-normalised)."""
    e = torch.from_numpy(np.asarray(embeddings, np.float32))
    n = len(e)
    return lambda q, a, b: torch.from_numpy(np.asarray(q.csr(n, a, b) @ e.numpy(), np.float32)) @ e.T


def user_history(store: GraphStore) -> ScoreFn:
    """The query's user's own past purchases and interactions, ranked by frequency and recency: the user's
    decayed user–item weights (:meth:`~graph.store.GraphStore.user_item_matrix`). Queries without a known user,
    and ties, fall back on popularity (a millionth of a purchase's weight per order)."""
    r = store.user_item_matrix().tocsr()
    counts = store.item_order_counts().astype(np.float32) * 1e-6 / max(1.0, float(store.item_order_counts().max()))

    def score(q: Queries, a: int, b: int) -> torch.Tensor:
        users = q.users[a:b]
        out = np.tile(counts, (b - a, 1))
        known = users >= 0
        if known.any():
            out[known] += r[users[known]].toarray()
        return torch.from_numpy(out)

    return score


def text_ease(store: GraphStore, text: np.ndarray, lam: float, alpha: float, cold: float = 0.0) -> torch.Tensor:
    """EASE^R with the text embeddings as side information (collective EASE, Jeunen et al., RecSys 2020):
    the GNN's decoder without the GNN (``cold``: its text weight towards items without orders). Dense."""
    view = side_view(text)
    return decoder_weights(item_gram(store), [(alpha, view)], lam, cold=(cold, view))


def sansa_installed() -> bool:
    """Whether the ``sansa`` package (and SuiteSparse under it) imports: ``make bench`` installs it."""
    try:
        import sansa  # noqa: F401
    except ImportError:
        return False
    return True


def sansa(store: GraphStore, l2: float = 20.0, density: float = 100.0) -> ScoreFn:
    """SANSA (Spišák et al., "Scalable Approximate NonSymmetric Autoencoder for Collaborative Filtering",
    RecSys 2023): EASE^R through a sparse approximate inverse of the Gram matrix, ``density`` weights per item
    on average, from the ``sansa`` package (see :func:`sansa_installed`)."""
    from sansa import ICFGramianFactorizerConfig, SANSA, SANSAConfig, UMRUnitLowerTriangleInverterConfig

    x = basket_matrix(store).astype(np.float32).tocsc()
    bought = np.flatnonzero(np.diff(x.indptr))  # SANSA's scaling fails on an item without orders
    x = x[:, bought].tocsr()
    config = SANSAConfig(l2=l2, weight_matrix_density=density / max(1, x.shape[1]),
                         gramian_factorizer_config=ICFGramianFactorizerConfig(factorization_shift_step=1e-3,
                                                                              factorization_shift_multiplier=2.0),
                         lower_triangle_inverter_config=UMRUnitLowerTriangleInverterConfig(scans=1,
                                                                                             finetune_steps=5))
    model = SANSA(config)
    model.fit(x)
    w1, w2 = model.weights
    n = store.num_items

    def score(q: Queries, a: int, b: int) -> torch.Tensor:
        out = torch.full((b - a, n), -1e30)  # an item without training orders is never predicted
        out[:, torch.from_numpy(bought)] = _dense((q.csr(n, a, b)[:, bought] @ w1) @ w2)
        return out

    return score
