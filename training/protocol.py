"""The evaluation protocol: a time split of orders and leave-one-out basket queries.

Earlier invoices train, the last ``test_frac`` of placed orders test, and the
last ``val_frac`` of the training orders validate (tuning and early stopping);
orders of one time are never split between two periods.
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

import bisect
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from graph.events import Interaction, InteractionFacts, ItemUpserted, Order, OrderFacts
from graph.store import GraphConfig, GraphStore
from training.datasets import Spooled

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
        """``(Q, num_items)``: 1/|query| on each query's items (dense: for small catalogs and tests)."""
        return torch.from_numpy(self.csr(num_items).toarray().astype(np.float32))

    def csr(self, num_items: int, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """Queries ``start .. stop-1`` as a sparse ``(Q, num_items)`` matrix, 1/|query| on each query's items."""
        items = self.items[start:stop]
        lengths = np.fromiter((len(r) for r in items), np.int64, len(items))
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        index = np.concatenate(items) if items else np.zeros(0, np.int64)
        return sp.csr_matrix((np.repeat(1.0 / np.maximum(lengths, 1), lengths), index, indptr),
                             shape=(len(items), num_items))

    def subset(self, mask: np.ndarray) -> "Queries":
        """The queries where ``mask`` is True (or at the positions ``mask`` lists)."""
        pick = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return Queries([self.items[k] for k in pick.tolist()], self.hidden[pick], self.users[pick], self.cold[pick])


@dataclass
class Split:
    """Stores and queries of one time split."""

    fit: GraphStore | None  # train minus validation, for tuning (None once released: see ``training.job``)
    train: GraphStore | None  # all training orders, for the final fit (None: not built, ``with_train=False``)
    val: Queries  # over fit's item rows
    test: Queries  # over train's item rows
    protocol: dict[str, object]
    held_out: frozenset[str] = frozenset()  # items removed from the training period (leave-items-out)

    def held_out_queries(self) -> np.ndarray:
        """Test queries whose hidden item is held out."""
        ids = self.train.items.ids
        return np.array([ids[h] in self.held_out for h in self.test.hidden], bool)


def _training_store(config: GraphConfig) -> GraphStore:
    return GraphStore(config.model_copy(update={"order_window_days": None}))  # training reads every order


def _without(event: Spooled, held: frozenset[str]) -> Spooled | None:
    """``event`` with the held-out items removed (None when nothing is left)."""
    if isinstance(event, OrderFacts):
        kept = tuple(i for i in event.item_ids if i not in held)
        return None if not kept else event if len(kept) == len(event.item_ids) else event._replace(item_ids=kept)
    if isinstance(event, (Interaction, InteractionFacts)) and event.item_id in held:
        return None
    return event


def _queries(orders: list[OrderFacts], store: GraphStore, rng: np.random.Generator,
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


Events = Sequence[Event] | Callable[[], Iterable[Event]]
"""Events in time order: a list, or a function that reads them afresh (a file too large to hold)."""


def _facts(events: Events) -> Iterator[Spooled]:
    for event in events() if callable(events) else events:
        yield event.facts() if isinstance(event, Order) else event


def _between_times(times: list[float], k: int) -> int:
    """Cut ``k`` (an index into the placed orders' times, ascending) moved back to the first order of its time,
    so that orders of one time are never split between two periods; past the last of them instead where that
    time is the first. On the Amazon intent bundles (dates are days) a session and the bundle marked in it are
    two orders of one day: split, the validation bundle's items were already bought together in training."""
    if k == 0 or k >= len(times) or times[k - 1] != times[k]:
        return k
    first = bisect.bisect_left(times, times[k])
    if first > 0:
        return first
    after = bisect.bisect_right(times, times[k])
    return after if after < len(times) else k


def time_split(
    events: Events, config: GraphConfig, seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1,
    held_out: float = 0.0, batch: int = 20_000, with_train: bool = True,
) -> Split:
    """Split ``events`` (in time order) by placed orders; ``held_out``: the share of items left out of
    training entirely (see the module docstring); ``with_train=False`` (no test window): only the fit store
    is built, ``train`` is None (a large shop's second store is gigabytes; ``training.job`` builds the full
    store after training instead).

    Two passes over the events, so a file need not fit in memory: the first finds the placed orders' positions
    (the cuts) and the catalog, the second applies each event to the stores it belongs to and keeps only the
    validation and test orders.
    """
    placed: list[int] = []
    seen: set[str] = set()
    catalog: dict[str, ItemUpserted] = {}  # the newest upsert of every item: the shop lists it, text known
    bought: set[str] = set()
    times: list[float] = []
    last = -np.inf
    for pos, e in enumerate(_facts(events)):
        if e.epoch < last:
            raise ValueError(f"event {pos} is dated before the one before it: time_split needs events in time order")
        last = e.epoch
        if isinstance(e, OrderFacts) and e.status == "placed" and e.order_id not in seen:
            seen.add(e.order_id)
            placed.append(pos)
            times.append(e.epoch)
        elif isinstance(e, ItemUpserted):
            catalog[e.item_id] = e
    del seen
    total = pos + 1 if placed or catalog else 0
    cut = _between_times(times, int(len(placed) * (1 - test_frac)))
    test_start = placed[cut] if cut < len(placed) else total  # test_frac=0: no test window
    train_placed = [p for p in placed if p < test_start]
    val_at = _between_times(times[:len(train_placed)], int(len(train_placed) * (1 - val_frac)))
    val_start = train_placed[val_at]
    held: frozenset[str] = frozenset()
    if held_out:
        for e in _facts(events):  # items of training orders, beside the catalog's
            if isinstance(e, OrderFacts) and e.status == "placed":
                bought.update(e.item_ids)
        known = sorted(set(catalog) | bought)
        pick = np.random.default_rng([seed, 1]).choice(len(known), round(held_out * len(known)), replace=False)
        held = frozenset(known[i] for i in pick)
    if not with_train and (test_frac or held_out):
        raise ValueError("with_train=False needs test_frac=0 and held_out=0: test queries are over the train store")
    fit, train = _training_store(config), _training_store(config) if with_train else None
    placed_at = set(placed)
    val_orders: list[OrderFacts] = []
    test_orders: list[OrderFacts] = []
    chunk: list[Spooled] = []
    fit_upto = 0  # events [0, fit_upto) of the current chunk also go to the fit store

    def flush() -> None:
        fit.apply_many(chunk[:fit_upto])
        if train is not None:
            train.apply_many(chunk)
        chunk.clear()

    for pos, e in enumerate(_facts(events)):
        if pos >= test_start:
            if pos in placed_at:
                test_orders.append(e)
            continue
        if pos in placed_at and pos >= val_start and (x := _without(e, held)) is not None:
            val_orders.append(x)
        x = _without(e, held) if held else e
        if x is None:
            continue
        chunk.append(x)
        if pos < val_start:
            fit_upto = len(chunk)
        if len(chunk) >= batch:
            flush()
            fit_upto = 0
    flush()
    for store in (fit, train) if train is not None else (fit,):  # items the shop lists later: text, no edges
        store.apply_many([e for item, e in catalog.items() if item not in store.items])
    rng = np.random.default_rng(seed)
    widest = fit if train is None else train  # the train store (the fit store when it was not built)
    val, test = _queries(val_orders, fit, rng), _queries(test_orders, widest, rng, prefer=held)
    iso = lambda k: datetime.fromtimestamp(times[k], timezone.utc).isoformat()  # noqa: E731
    protocol = {
        "seed": seed, "test_frac": test_frac, "val_frac": val_frac,
        "train_orders": len(train_placed), "val_queries": len(val), "test_queries": len(test),
        "cold_start_test_queries": int(test.cold.sum()), "catalog_items": widest.num_items,
        "test_from": iso(cut) if cut < len(placed) else None,
        "val_from": iso(val_at), "val_from_epoch": times[val_at],
    }
    split = Split(fit, train, val, test, protocol, held)
    if held_out:
        protocol.update({"held_out": held_out, "held_out_items": len(held),
                         "held_out_test_queries": int(split.held_out_queries().sum())})
    return split


ScoreFn = Callable[[Queries, int, int], "torch.Tensor | sp.csr_matrix"]
"""Scores of every item for queries ``start .. stop-1``: a ``(stop - start, num_items)`` tensor, or sparse rows
(items a row does not store score 0; a neighbourhood decoder's scores, :func:`sparse_ranks`)."""


def dense(scores: "torch.Tensor | sp.spmatrix") -> torch.Tensor:
    """A scorer's output as a dense tensor."""
    return torch.from_numpy(scores.toarray()) if sp.issparse(scores) else scores


@dataclass
class Ranked:
    """Where each query's hidden item ranked (0 = best; ties count half), and each query's top 10."""

    rank: np.ndarray
    top10: np.ndarray

    def metrics(self, num_items: int) -> dict[str, float]:
        return metrics(torch.from_numpy(self.rank), torch.from_numpy(self.top10), num_items)

    def subset(self, mask: np.ndarray) -> "Ranked":
        return Ranked(self.rank[mask], self.top10[mask])


def rank_queries(score: ScoreFn, queries: Queries, num_items: int, chunk: int = 512, top: bool = True) -> Ranked:
    """Rank every query's hidden item among the items not in its query, ``chunk`` queries at a time: the full
    ``(queries × items)`` score matrix of a large catalog would not fit in memory. ``top``: each query's top 10
    too (for coverage; without it they are left 0)."""
    return rank_many([score], queries, num_items, chunk, top)[0]


def rank_many(scores: Sequence[ScoreFn], queries: Queries, num_items: int, chunk: int = 512,
              top: bool = True) -> list[Ranked]:
    """:func:`rank_queries` of several scorers, every scorer on a chunk before the next chunk, so scorers that
    share a part (one decoder's scores under several weights of a user term) can compute it once a chunk
    (:func:`training.train.tune_weight`)."""
    rank = [np.zeros(len(queries)) for _ in scores]
    top10 = [np.zeros((len(queries), min(10, num_items)), np.int64) for _ in scores]
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        part = queries.subset(np.arange(len(queries))[start:stop])
        for k, score in enumerate(scores):
            out = score(queries, start, stop)
            if sp.issparse(out) and not top:
                rank[k][start:stop] = sparse_ranks(out, part)
                continue
            masked = _masked(dense(out).float().clone(), part)  # a copy: a scorer may keep its own
            rank[k][start:stop] = _ranks(masked, part).numpy()
            if top:
                top10[k][start:stop] = masked.topk(top10[k].shape[1], dim=1).indices.numpy()
    return [Ranked(r, t) for r, t in zip(rank, top10)]


def _masked(scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """``scores`` with each query's own items at -inf (in place): they are not answers."""
    rows = np.repeat(np.arange(len(queries)), [len(r) for r in queries.items])
    cols = np.concatenate(queries.items) if len(queries) else np.zeros(0, np.int64)
    scores[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = -torch.inf
    return scores


def _ranks(masked: torch.Tensor, queries: Queries) -> torch.Tensor:
    m = masked.detach().numpy()  # numpy counts a comparison 6× faster than torch's sum of booleans
    target = m[np.arange(len(queries)), queries.hidden][:, None]
    greater = np.count_nonzero(m > target, axis=1)
    ties = np.count_nonzero(m == target, axis=1) - 1
    return torch.from_numpy(greater + ties / 2)


def sparse_ranks(scores: sp.spmatrix, queries: Queries) -> np.ndarray:
    """:func:`_ranks` of sparse score rows without making them dense: an item a row does not store scores 0,
    a query's own items are left out. Ranking a neighbourhood decoder's rows this way reads their ~10³ stored
    scores instead of every catalog item's (200 k items: the decoder's tuning ranked dense rows for most of
    its time)."""
    s = sp.csr_matrix(scores)
    s.sum_duplicates()  # canonical: sorted, one entry per (row, column)
    num, n = s.shape
    rows = np.repeat(np.arange(num, dtype=np.int64), np.diff(s.indptr))
    key = rows * n + s.indices
    lengths = [len(r) for r in queries.items]
    own = np.unique(np.repeat(np.arange(num, dtype=np.int64), lengths) * n
                    + (np.concatenate(queries.items).astype(np.int64) if num else np.zeros(0, np.int64)))
    keep = ~np.isin(key, own, assume_unique=True)
    want = np.arange(num, dtype=np.int64) * n + queries.hidden
    at = np.searchsorted(key, want)
    stored = at < len(key)
    stored[stored] = key[at[stored]] == want[stored]
    target = np.zeros(num)
    target[stored] = s.data[at[stored]]  # the hidden item's score; 0 where the row does not store it
    r, v = rows[keep], s.data[keep]
    implicit = n - np.bincount(r, minlength=num) - np.bincount(own // n, minlength=num)  # unstored, not own
    greater = np.bincount(r, weights=v > target[r], minlength=num) + np.where(target < 0, implicit, 0)
    ties = np.bincount(r, weights=v == target[r], minlength=num) + np.where(target == 0, implicit, 0) - 1
    return greater + ties / 2


def ranks(scores: torch.Tensor, queries: Queries) -> torch.Tensor:
    """Rank (0 = best) of each hidden item among items not in its query; ties count half."""
    return _ranks(_masked(scores.clone(), queries), queries)


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
    # a draw where b scores 0 and a does not is an unbounded gain (+inf): the percentiles then take draws
    # themselves (interpolating between two +inf is nan), so such a bound reads +inf, not nan
    method = "linear" if np.isfinite(draws[~np.isnan(draws)]).all() else "nearest"
    low, high = np.nanpercentile(draws, [2.5, 97.5], method=method) if not np.isnan(draws).all() \
        else (float("nan"),) * 2
    return {"gain": gain, "low": float(low), "high": float(high), "runs": each}


def evaluate_scores(scores: torch.Tensor, queries: Queries, num_items: int) -> dict[str, float]:
    """All metrics of a ``(Q, num_items)`` score matrix."""
    return rank_queries(lambda q, a, b: scores[a:b], queries, num_items).metrics(num_items)
