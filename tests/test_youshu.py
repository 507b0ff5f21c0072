"""training.youshu: the similar-users term and the benchmark's Recall / NDCG, on matrices small enough to check
by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from training.youshu import Youshu, ranked_metrics


def _youshu(train: list[list[int]], books: list[list[int]], bundles: int = 4, items: int = 3) -> Youshu:
    def matrix(rows: list[list[int]], width: int) -> sp.csr_matrix:
        m = np.zeros((len(rows), width), np.float32)
        for u, cols in enumerate(rows):
            m[u, cols] = 1
        return sp.csr_matrix(m)

    empty = sp.csr_matrix((len(train), bundles), dtype=np.float32)
    return Youshu(matrix(train, bundles), empty, empty, matrix(books, items), sp.csr_matrix((bundles, items)))


def test_similar_users_is_kernel_ridge_over_shared_bundles_and_books() -> None:
    # users 0 and 1 read the same book but share no bundle; user 2 shares nothing with either
    y = _youshu(train=[[0], [1], [2]], books=[[0], [0], [1]])
    s = y.similar_users(lam=0.5)
    yb, r = y.train.toarray().astype(np.float64), y.user_item.toarray().astype(np.float64)
    idf_b, idf_r = np.log(3 / np.maximum(yb.sum(0), 1)), np.log(3 / np.maximum(r.sum(0), 1))
    kernel = yb @ np.diag(idf_b) @ yb.T + r @ np.diag(idf_r) @ r.T
    expected = kernel @ np.linalg.solve(kernel + 0.5 * np.eye(3), yb)
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)
    assert s.dtype == np.float32 and s.shape == (3, 4)
    # the shared book makes user 1's bundle a vote for user 0, and user 2's bundle none
    assert s[0, 1] > 0.05 and s[0, 2] == pytest.approx(0.0, abs=1e-6) and s[0, 3] == pytest.approx(0.0, abs=1e-6)


def test_ranked_metrics_masks_seen_and_counts_hits() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    truth = sp.csr_matrix(np.array([[0, 0, 1, 1], [0, 0, 0, 0]], np.float32))
    out = ranked_metrics(scores, seen, truth, k=2)
    # user 0: bundle 0 masked, top 2 = [1, 2]: one of two test bundles; user 1 has none and is not counted
    assert out["users"] == 1 and out["recall"] == pytest.approx(0.5)
    assert out["ndcg"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
