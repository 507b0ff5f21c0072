"""BundleGNN: an inductive heterogeneous GNN for complementary-item recommendation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GraphConv, HeteroConv
from torch_geometric.utils import scatter

CO = ("item", "co_purchased", "item")
UI = ("user", "interacted", "item")
IU = ("item", "rev_interacted", "user")


class BundleGNN(nn.Module):
    r"""Inductive heterogeneous message passing over co-purchase and user–item edges.

    Items start from their features :math:`\mathbf{x}_i` (transformer text
    embedding, log-popularity, log-price), users from the weighted mean of
    their items' inputs, so a node never seen in training still gets an
    embedding from its text and whatever neighbours it has (GraphSAGE,
    Hamilton et al., NeurIPS 2017). Each layer is a ``HeteroConv`` of
    weighted ``GraphConv`` (Morris et al., AAAI 2019) over the three relations
    with edge weights normalised per target node (a weighted mean), plus a
    residual connection and layer norm:

    .. math::
        \mathbf{h}_i^{(l+1)} = \mathrm{LN}\Big(\mathbf{h}_i^{(l)} + \sigma\big(
        \sum_{r} \mathbf{W}_{r,1}\mathbf{h}_i^{(l)} + \mathbf{W}_{r,2}
        \sum_{j \in \mathcal{N}_r(i)} \tilde{w}_{ji}\,\mathbf{h}_j^{(l)}\big)\Big)

    Complementarity is asymmetric (a phone → its case, not the reverse), so an
    item has a *source* and a *target* view, as in the dual embeddings of
    Wang et al., "A Path-constrained Framework for Discriminating Substitutable
    and Complementary Products" (WSDM 2018):

    .. math::
        s(a \rightarrow b) = \langle \mathbf{P}\mathbf{h}_a, \mathbf{Q}\mathbf{h}_b \rangle + \beta_b,
        \qquad s(u, b) = \langle \mathbf{R}\mathbf{h}_u, \mathbf{Q}\mathbf{h}_b \rangle + \beta_b

    with :math:`\beta_b = \mathbf{w}^\top \mathbf{h}_b` an inductive item prior.

    Args:
        in_channels (int): item feature size.
        hidden_channels (int): size of node embeddings.
        num_layers (int): message-passing layers.
        dropout (float): dropout on embeddings during training.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 128, num_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.dropout = dropout
        self.item_in = nn.Linear(in_channels, hidden_channels)
        self.user_in = nn.Linear(in_channels, hidden_channels)
        self.convs = nn.ModuleList(
            HeteroConv({rel: GraphConv(hidden_channels, hidden_channels, aggr="add") for rel in (CO, UI, IU)}, aggr="sum")
            for _ in range(num_layers)
        )
        self.norms = nn.ModuleList(
            nn.ModuleDict({"item": nn.LayerNorm(hidden_channels), "user": nn.LayerNorm(hidden_channels)})
            for _ in range(num_layers)
        )
        self.src = nn.Linear(hidden_channels, hidden_channels, bias=False)
        self.dst = nn.Linear(hidden_channels, hidden_channels, bias=False)
        self.user = nn.Linear(hidden_channels, hidden_channels, bias=False)
        self.prior = nn.Linear(hidden_channels, 1)

    def forward(
        self, x_item: Tensor, num_users: int, edge_index_dict: dict[tuple[str, str, str], Tensor],
        edge_weight_dict: dict[tuple[str, str, str], Tensor],
    ) -> dict[str, Tensor]:
        """Embeddings of all items and users. Edge weights must be normalised per target."""
        ui = edge_index_dict[UI]
        x_user = scatter(x_item[ui[1]] * edge_weight_dict[IU].unsqueeze(-1), ui[0], 0, dim_size=num_users, reduce="sum")
        h = {"item": self.item_in(x_item), "user": self.user_in(x_user)}
        for conv, norms in zip(self.convs, self.norms):
            out = conv(h, edge_index_dict, edge_weight_dict=edge_weight_dict)
            h = {k: norms[k](h[k] + nn.functional.dropout(torch.relu(out[k]), self.dropout, self.training)) for k in h}
        return h

    def complement_scores(self, h_item: Tensor, query: Tensor, candidates: Tensor | None = None) -> Tensor:
        """Scores of candidates as complements of each query.

        ``query`` is a ``(Q, num_items)`` weight matrix (a row per basket, e.g.
        1/|basket| on its items); the basket's source view is the weighted sum
        of its items' source views.
        """
        target = h_item if candidates is None else h_item[candidates]
        return (query @ self.src(h_item)) @ self.dst(target).T + self.prior(target).squeeze(-1)

    def user_scores(self, h_user: Tensor, h_item: Tensor, users: Tensor, candidates: Tensor | None = None) -> Tensor:
        """Scores of candidates for the given users."""
        target = h_item if candidates is None else h_item[candidates]
        return self.user(h_user[users]) @ self.dst(target).T + self.prior(target).squeeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, num_layers={self.num_layers})"
