"""The evaluation protocol: a time split of orders and leave-one-out basket queries.

Earlier invoices train, the last ``test_frac`` of placed orders test, and the
last ``val_frac`` of the training orders validate (tuning and early stopping).
Each test basket with at least two distinct items hides one item (seeded); the
rest is the query; every catalog item not in the query is ranked. Items that
first appear in the test period are in the catalog (their text is known) but
have no edges: hiding one of them is a *cold-start* query.

That natural cold-start slice is small (33 test queries on the Online Retail
II subset), so ``held_out`` adds the *leave-items-out* variant: a seeded
share of the catalog is removed from every training-period event (their text
stays in the catalog), and a test basket that holds such an item hides one
of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from graph.events import Interaction, ItemUpserted, Order
from graph.store import GraphConfig, GraphStore

Event = ItemUpserted | Interaction | Order


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
    held_out: frozenset[str] = frozenset()  # items removed from the training period (leave-items-out)

    def held_out_queries(self) -> np.ndarray:
        """Test queries whose hidden item is held out."""
        ids = self.train.items.ids
        return np.array([ids[h] in self.held_out for h in self.test.hidden], bool)


def _store(events: list[Event], catalog: list[ItemUpserted], config: GraphConfig) -> GraphStore:
    store = GraphStore(config.model_copy(update={"order_window_days": None}))  # training reads every order
    store.apply_all(events)
    for event in catalog:  # items the shop lists later: known text, no edges yet
        if event.item_id not in store.items:
            store.apply(event)
    return store


def _without(event: Event, held: frozenset[str]) -> Event | None:
    """``event`` with the held-out items removed (None when nothing is left)."""
    if isinstance(event, Order):
        lines = [line for line in event.items if line.item_id not in held]
        return None if not lines else event if len(lines) == len(event.items) else event.model_copy(update={"items": lines})
    if isinstance(event, Interaction) and event.item_id in held:
        return None
    return event


def _queries(orders: list[Order], store: GraphStore, rng: np.random.Generator,
             prefer: frozenset[str] = frozenset()) -> Queries:
    """One query per basket of two or more known items; the hidden item is drawn among ``prefer`` when the
    basket holds any."""
    counts = store.item_order_counts()
    items, hidden, users, cold = [], [], [], []
    for order in orders:
        ids = [i for i in order.item_ids if i in store.items]
        rows = [store.items.index[i] for i in ids]
        if len(rows) < 2:
            continue
        among = [j for j, i in enumerate(ids) if i in prefer] or list(range(len(rows)))
        k = among[int(rng.integers(len(among)))]
        items.append(np.array(rows[:k] + rows[k + 1 :], np.int64))
        hidden.append(rows[k])
        users.append(store.users.get(order.user_id) if order.user_id and order.user_id in store.users else -1)
        cold.append(counts[rows[k]] == 0)
    return Queries(items, np.array(hidden, np.int64), np.array(users, np.int64), np.array(cold, bool))


def time_split(
    events: list[Event], config: GraphConfig, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1,
    held_out: float = 0.0,
) -> Split:
    """Split ``events`` (in time order) by placed orders; ``held_out``: the share of items left out of
    training entirely (see the module docstring)."""
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
    held: frozenset[str] = frozenset()
    if held_out:
        known = sorted({e.item_id for e in catalog} | {i for p in train_placed for i in events[p].item_ids})
        pick = np.random.default_rng([seed, 1]).choice(len(known), round(held_out * len(known)), replace=False)
        held = frozenset(known[i] for i in pick)

    def past(stop: int) -> list[Event]:  # the events before ``stop``, without the held-out items
        return [x for e in events[:stop] if (x := _without(e, held)) is not None] if held else events[:stop]

    fit = _store(past(val_start), catalog, config)
    train = _store(past(test_start), catalog, config)
    rng = np.random.default_rng(seed)
    val_orders = [x for p in placed if val_start <= p < test_start if (x := _without(events[p], held)) is not None]
    test_orders = [events[p] for p in placed if p >= test_start]
    val, test = _queries(val_orders, fit, rng), _queries(test_orders, train, rng, prefer=held)
    protocol = {
        "seed": seed, "test_frac": test_frac, "val_frac": val_frac,
        "train_orders": len(train_placed), "val_queries": len(val), "test_queries": len(test),
        "cold_start_test_queries": int(test.cold.sum()), "catalog_items": train.num_items,
        "test_from": events[test_start].ts.isoformat() if test_start < len(events) else None,
        "val_from": events[val_start].ts.isoformat(),
    }
    split = Split(fit, train, val, test, protocol, held)
    if held_out:
        protocol.update({"held_out": held_out, "held_out_items": len(held),
                         "held_out_test_queries": int(split.held_out_queries().sum())})
    return split


def ranks(scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """Rank (0 = best) of each hidden item among items not in its query; ties count half."""
    scores = scores.clone()
    for k, rows in enumerate(queries.items):
        scores[k, torch.from_numpy(rows)] = -torch.inf
    target = scores[torch.arange(len(queries)), torch.from_numpy(queries.hidden)].unsqueeze(1)
    greater = (scores > target).sum(1).float()
    ties = (scores == target).sum(1).float() - 1
    return greater + ties / 2


def per_query(rank: torch.Tensor) -> dict[str, np.ndarray]:
    """Each query's hit@10 and NDCG@10 from its hidden item's rank; their means are HR@10 and NDCG@10."""
    r = rank.double().numpy()
    return {"hr@10": (r < 10).astype(np.float64), "ndcg@10": np.where(r < 10, 1 / np.log2(r + 2), 0.0)}


def metrics(rank: torch.Tensor, top10: torch.Tensor, num_items: int) -> dict[str, float]:
    """HR@10, NDCG@10, Recall@20 (one hidden item: hit at 20), MRR and catalogue coverage@10."""
    if len(rank) == 0:
        return {"hr@10": float("nan"), "ndcg@10": float("nan"), "recall@20": float("nan"), "mrr": float("nan"),
                "coverage": float("nan"), "queries": 0}
    each = per_query(rank)
    return {
        "hr@10": float(each["hr@10"].mean()),
        "ndcg@10": float(each["ndcg@10"].mean()),
        "recall@20": float((rank < 20).float().mean()),
        "mrr": float((1 / (rank + 1)).mean()),
        "coverage": float(len(torch.unique(top10)) / num_items),
        "queries": len(rank),
    }


def relative_gain(a: Sequence[np.ndarray], b: Sequence[np.ndarray], resamples: int = 2000,
                  seed: int = 0) -> dict[str, float | list[float]]:
    """How much better method ``a`` is than ``b``: ``mean(a) / mean(b) - 1`` over per-query values pooled
    over runs (one array per run, e.g. per seed), with a 95 % interval and each run's own gain.

    The interval is a two-level paired bootstrap: each resample draws runs with replacement, then each
    drawn run's queries with replacement, and scores both methods on the same draw (hierarchical
    bootstrap, Saravanan et al., "Application of the hierarchical bootstrap to multi-level data in
    neuroscience", 2020; percentile intervals, Efron & Tibshirani 1993). Drawing runs too keeps a gain
    that one seed alone carries from looking certain; with one run it is the usual paired bootstrap.
    Returns ``{"gain", "low", "high", "runs"}``.
    """
    if not a or len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("a and b need the same runs with the same queries")
    rng = np.random.default_rng(seed)
    k = len(a)
    # sums of a and b over one query resample of run r, for every (resample, slot) pair
    sum_a, sum_b = np.zeros((k, resamples * k)), np.zeros((k, resamples * k))
    for r, (x, y) in enumerate(zip(a, b)):
        for start in range(0, resamples * k, 250):  # bounded memory on large query sets
            pick = rng.integers(len(x), size=(min(250, resamples * k - start), len(x)))
            sum_a[r, start : start + len(pick)] = x[pick].sum(1)
            sum_b[r, start : start + len(pick)] = y[pick].sum(1)
    runs = rng.integers(k, size=(resamples, k))
    slots = np.arange(resamples * k).reshape(resamples, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = sum_a[runs, slots].sum(1) / sum_b[runs, slots].sum(1) - 1
        each = [float(x.sum() / y.sum() - 1) for x, y in zip(a, b)]
        gain = float(sum(x.sum() for x in a) / sum(y.sum() for y in b) - 1)
    low, high = np.nanpercentile(draws, [2.5, 97.5]) if np.isfinite(draws).any() else (float("nan"),) * 2
    return {"gain": gain, "low": float(low), "high": float(high), "runs": each}


def evaluate_scores(scores: torch.Tensor, queries: Queries, num_items: int) -> dict[str, float]:
    """All metrics of a ``(Q, num_items)`` score matrix."""
    rank = ranks(scores, queries)
    masked = scores.clone()
    for k, rows in enumerate(queries.items):
        masked[k, torch.from_numpy(rows)] = -torch.inf
    return metrics(rank, masked.topk(min(10, num_items), dim=1).indices, num_items)
