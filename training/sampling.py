"""Neighbour sampling for GNN training steps on graphs too large for a full-graph step.

A full-graph step keeps every node's activations of every layer for the backward pass, so its memory grows
with the whole graph (items and users) whatever the batch. A sampled step computes only the embeddings the
batch's loss reads: those of its seed nodes (the queries' items, the candidates and the batch's users)
through a computation graph of at most ``fanouts[l]`` sampled neighbours per node, relation and layer, as
in GraphSAGE (Hamilton et al., "Inductive Representation Learning on Large Graphs", NeurIPS 2017). The
sampled nodes and edges form one subgraph on which the unchanged model runs, as in ShaDow-GNN (Zeng et al.,
"Decoupling the Depth and Scope of Graph Neural Networks", NeurIPS 2021): a seed's embedding on it is
exactly its full-graph embedding with each aggregation over the drawn neighbours, so with fanouts at least
the largest degree it equals the full-graph embedding (a test checks it).

A node with more neighbours than the fanout draws them with replacement in proportion to the edge weights
(:func:`sample_in_edges`), so the mean over the draws estimates its weighted mean without bias. Every step
is vectorised torch on the graph's device, so the same code runs on CPU and CUDA. pyg-lib's sampler is not
used: it is not on the package registries this project installs from, and these steps need the edge
weights and the user-as-mean-of-items input that torch-geometric's loaders do not carry.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.models import Adjacency
from training.models.bundle_gnn import CO, IU, UI

Relation = tuple[str, str, str]


def cumulative_weights(adj: Adjacency, weight: Tensor) -> Tensor:
    """``weight`` summed along the relation's CSR order (float64, a leading 0): target ``t``'s edges span
    ``[c[crow[t]], c[crow[t + 1]])``, so a uniform draw in it picks an edge in proportion to its weight."""
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=weight.device),
                      torch.cumsum(adj.csr.values(weight).double(), 0)])


def sample_in_edges(adj: Adjacency, cumulative: Tensor, weight: Tensor, targets: Tensor,
                    fanout: int) -> tuple[Tensor, Tensor]:
    """In-edges of each target (ids in ``edge_index`` order) and their weights in the sample.

    A target with at most ``fanout`` in-edges keeps them all with their own weights. A target with more
    draws ``fanout`` of them with replacement, in proportion to their weights (inverse transform on
    :func:`cumulative_weights`: a binary search per draw, no sort of the target's edges), and each drawn
    edge weighs its number of draws: the mean over the draws is an unbiased estimate of the target's
    weighted mean, which a sample without replacement is not.
    """
    device = targets.device
    crow = adj.csr.crow
    start, end = crow[targets], crow[targets + 1]
    degree = end - start
    light = degree <= fanout
    # every edge of the light targets
    few = degree * light
    first = torch.cumsum(few, 0) - few
    row = torch.repeat_interleave(torch.arange(len(targets), device=device), few)
    light_edges = adj.csr.edges(start[row] + torch.arange(len(row), device=device) - first[row])
    heavy = targets[~light]
    if not len(heavy):
        return light_edges, weight[light_edges]
    lo, hi = cumulative[crow[heavy]], cumulative[crow[heavy + 1]]
    u = torch.rand(len(heavy), fanout, dtype=torch.float64, device=device)
    pos = torch.searchsorted(cumulative, lo[:, None] + u * (hi - lo)[:, None], right=True) - 1
    pos = torch.minimum(torch.maximum(pos, crow[heavy][:, None]), crow[heavy + 1][:, None] - 1)
    drawn, counts = torch.unique(adj.csr.edges(pos.reshape(-1)), return_counts=True)
    return torch.cat([light_edges, drawn]), torch.cat([weight[light_edges], counts.to(weight.dtype)])


class NeighbourSample:
    """The nodes and edges of one sampled computation graph, in the parent graph's ids.

    ``items`` and ``users`` list the sampled nodes, the seeds first; ``edges`` holds each relation's sampled
    edge ids and ``weights`` their weights in the sample (:func:`sample_in_edges`; not yet normalised per
    target). :meth:`local` maps parent ids to rows of the subgraph.
    """

    def __init__(self, items: Tensor, users: Tensor, edges: dict[Relation, Tensor], weights: dict[Relation, Tensor],
                 num_items: int, num_users: int) -> None:
        self.items, self.users, self.edges, self.weights = items, users, edges, weights
        self._item_row = torch.full((num_items,), -1, dtype=torch.long, device=items.device)
        self._item_row[items] = torch.arange(len(items), device=items.device)
        self._user_row = torch.full((num_users,), -1, dtype=torch.long, device=items.device)
        self._user_row[users] = torch.arange(len(users), device=items.device)

    def local(self, kind: str, ids: Tensor) -> Tensor:
        """Rows in the subgraph of the parent's ``kind`` ("item" or "user") nodes ``ids`` (-1: not sampled)."""
        return (self._item_row if kind == "item" else self._user_row)[ids]


def sample_neighbourhood(adjacency: dict[Relation, Adjacency], cumulative: dict[Relation, Tensor],
                         weight: dict[Relation, Tensor], seed_items: Tensor, seed_users: Tensor, fanouts: list[int],
                         num_items: int, num_users: int) -> NeighbourSample:
    """The computation graph of :class:`~training.models.BundleGNN` for the seeds, one layer per fanout.

    A node first reached at hop ``d`` needs its layer ``L - d`` embedding, so its in-edges are sampled at hop
    ``d + 1`` for ``d < L``; each node's neighbours are drawn once. A user's input is the mean of its items'
    inputs (:meth:`BundleGNN.forward`), so users reached at the last hop also get their item edges drawn.
    """
    device = seed_items.device
    seen = {"item": torch.zeros(num_items, dtype=torch.bool, device=device),
            "user": torch.zeros(num_users, dtype=torch.bool, device=device)}
    order = {"item": [torch.unique(seed_items)], "user": [torch.unique(seed_users)]}
    for kind in seen:
        seen[kind][order[kind][0]] = True
    edges: dict[Relation, list[Tensor]] = {rel: [] for rel in (CO, UI, IU)}
    weights: dict[Relation, list[Tensor]] = {rel: [] for rel in (CO, UI, IU)}
    frontier = {kind: order[kind][0] for kind in seen}

    def expand(rels: tuple[Relation, ...], fanout: int) -> dict[str, Tensor]:
        found: dict[str, list[Tensor]] = {"item": [], "user": []}
        for rel in rels:
            src_kind, _, dst_kind = rel
            picked, w = sample_in_edges(adjacency[rel], cumulative[rel], weight[rel], frontier[dst_kind], fanout)
            edges[rel].append(picked)
            weights[rel].append(w)
            found[src_kind].append(adjacency[rel].src_of(picked))
        new = {}
        for kind, ids in found.items():
            ids = torch.unique(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.long, device=device)
            ids = ids[~seen[kind][ids]]
            seen[kind][ids] = True
            order[kind].append(ids)
            new[kind] = ids
        return new

    for fanout in fanouts:
        frontier = expand((CO, UI, IU), fanout)
    expand((IU,), fanouts[-1])  # the last hop's users: their input is the mean of their items'
    return NeighbourSample(torch.cat(order["item"]), torch.cat(order["user"]),
                           {rel: torch.cat(ids) for rel, ids in edges.items()},
                           {rel: torch.cat(w) for rel, w in weights.items()}, num_items, num_users)
