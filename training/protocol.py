"""The evaluation protocol: a time split of orders and leave-one-out basket queries.

Earlier invoices train, the last ``test_frac`` of placed orders test, and the
last ``val_frac`` of the training orders validate (tuning and early stopping).
Each test basket with at least two distinct items hides one item (seeded); the
rest is the query; every catalog item not in the query is ranked. Items that
first appear in the test period are in the catalog (their text is known) but
have no edges: hiding one of them is a *cold-start* query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graph.events import ItemUpserted, Order
from graph.store import GraphConfig, GraphStore

Event = ItemUpserted | Order


@dataclass
class Queries:
    """Leave-one-out queries over a store's item rows."""

    items: list[np.ndarray]  # query item rows
    hidden: np.ndarray  # hidden item row per query
    users: np.ndarray  # user row per query, -1 if unknown
    cold: np.ndarray  # hidden item had no training order

    def __len__(self) -> int:
        return len(self.hidden)

    def matrix(self, num_items: int) -> torch.Tensor:
        """``(Q, num_items)``: 1/|query| on each query's items."""
        q = torch.zeros(len(self), num_items)
        for k, rows in enumerate(self.items):
            q[k, torch.from_numpy(rows)] = 1.0 / len(rows)
        return q

    def subset(self, mask: np.ndarray) -> "Queries":
        return Queries([r for r, m in zip(self.items, mask) if m], self.hidden[mask], self.users[mask], self.cold[mask])


@dataclass
class Split:
    """Stores and queries of one time split."""

    fit: GraphStore  # train minus validation, for tuning
    train: GraphStore  # all training orders, for the final fit
    val: Queries  # over fit's item rows
    test: Queries  # over train's item rows
    protocol: dict[str, object]


def _store(events: list[Event], catalog: list[ItemUpserted], config: GraphConfig) -> GraphStore:
    store = GraphStore(config)
    store.apply_all(events)
    for event in catalog:  # items the shop lists later: known text, no edges yet
        if event.item_id not in store.items:
            store.apply(event)
    return store


def _queries(orders: list[Order], store: GraphStore, rng: np.random.Generator) -> Queries:
    counts = store.item_order_counts()
    items, hidden, users, cold = [], [], [], []
    for order in orders:
        rows = [store.items.get(i) for i in order.item_ids]
        rows = [r for r in rows if r is not None]
        if len(rows) < 2:
            continue
        k = int(rng.integers(len(rows)))
        items.append(np.array(rows[:k] + rows[k + 1 :], np.int64))
        hidden.append(rows[k])
        users.append(store.users.get(order.user_id) if order.user_id and order.user_id in store.users else -1)
        cold.append(counts[rows[k]] == 0)
    return Queries(items, np.array(hidden, np.int64), np.array(users, np.int64), np.array(cold, bool))


def time_split(
    events: list[Event], config: GraphConfig, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1
) -> Split:
    """Split ``events`` (in time order) by placed orders; see the module docstring."""
    placed: list[int] = []
    seen: set[str] = set()
    for pos, e in enumerate(events):
        if isinstance(e, Order) and e.status == "placed" and e.order_id not in seen:
            seen.add(e.order_id)
            placed.append(pos)
    cut = int(len(placed) * (1 - test_frac))
    test_start = placed[cut] if cut < len(placed) else len(events)  # test_frac=0: no test window
    train_placed = [p for p in placed if p < test_start]
    val_start = train_placed[int(len(train_placed) * (1 - val_frac))]
    catalog = [e for e in events if isinstance(e, ItemUpserted)]
    fit = _store(events[:val_start], catalog, config)
    train = _store(events[:test_start], catalog, config)
    rng = np.random.default_rng(seed)
    val_orders = [events[p] for p in placed if val_start <= p < test_start]
    test_orders = [events[p] for p in placed if p >= test_start]
    val, test = _queries(val_orders, fit, rng), _queries(test_orders, train, rng)
    protocol = {
        "seed": seed, "test_frac": test_frac, "val_frac": val_frac,
        "train_orders": len(train_placed), "val_queries": len(val), "test_queries": len(test),
        "cold_start_test_queries": int(test.cold.sum()), "catalog_items": train.num_items,
        "test_from": events[test_start].ts.isoformat() if test_start < len(events) else None,
        "val_from": events[val_start].ts.isoformat(),
    }
    return Split(fit, train, val, test, protocol)


def ranks(scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """Rank (0 = best) of each hidden item among items not in its query; ties count half."""
    scores = scores.clone()
    for k, rows in enumerate(queries.items):
        scores[k, torch.from_numpy(rows)] = -torch.inf
    target = scores[torch.arange(len(queries)), torch.from_numpy(queries.hidden)].unsqueeze(1)
    greater = (scores > target).sum(1).float()
    ties = (scores == target).sum(1).float() - 1
    return greater + ties / 2


def metrics(rank: torch.Tensor, top10: torch.Tensor, num_items: int) -> dict[str, float]:
    """HR@10, NDCG@10, Recall@20 (one hidden item: hit at 20), MRR and catalogue coverage@10."""
    if len(rank) == 0:
        return {"hr@10": float("nan"), "ndcg@10": float("nan"), "recall@20": float("nan"), "mrr": float("nan"),
                "coverage": float("nan"), "queries": 0}
    return {
        "hr@10": float((rank < 10).float().mean()),
        "ndcg@10": float(torch.where(rank < 10, 1 / torch.log2(rank + 2), torch.zeros_like(rank)).mean()),
        "recall@20": float((rank < 20).float().mean()),
        "mrr": float((1 / (rank + 1)).mean()),
        "coverage": float(len(torch.unique(top10)) / num_items),
        "queries": len(rank),
    }


def evaluate_scores(scores: torch.Tensor, queries: Queries, num_items: int) -> dict[str, float]:
    """All metrics of a ``(Q, num_items)`` score matrix."""
    rank = ranks(scores, queries)
    masked = scores.clone()
    for k, rows in enumerate(queries.items):
        masked[k, torch.from_numpy(rows)] = -torch.inf
    return metrics(rank, masked.topk(min(10, num_items), dim=1).indices, num_items)
