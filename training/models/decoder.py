"""A closed-form item–item decoder over co-purchases, with node embeddings as side information."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class DecoderConfig(BaseModel):
    """The decoder's ridge strength and the weight of each kind of side information."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float = Field(25.0, gt=0, description="ridge λ on the item–item weights")
    text_weight: float = Field(0.0, ge=0, description="α of the text embeddings' Gram matrix")
    gnn_weight: float = Field(0.0, ge=0, description="α of the GNN item embeddings' Gram matrix")
    cold_weight: float = Field(0.03, ge=0, description="γ of the text cosine added towards items without orders")


def side_view(embeddings: np.ndarray | Tensor) -> Tensor:
    """Embeddings centred over the catalog and scaled to unit rows (the form the decoder's Gram uses).

    Sentence embeddings of shop titles share a large common direction;
    without centring every pair of items would look alike.
    """
    e = torch.as_tensor(embeddings).detach().to(torch.float64)
    e = e - e.mean(0, keepdim=True)
    return e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)


def decoder_weights(baskets: sp.csr_matrix, sides: Sequence[tuple[float, Tensor]], lam: float,
                    device: torch.device | str = "cpu", cold: tuple[float, Tensor] | None = None) -> Tensor:
    r"""The item × item weights :math:`\mathbf{B}` (float32, on ``device``); a basket ``q`` scores items as ``q @ B``.

    EASE^R (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data",
    WWW 2019) fits :math:`\mathbf{B}` in closed form by ridge regression of
    each item's column of the order × item matrix :math:`\mathbf{X}` on the
    other items, with a zero diagonal. Side information enters the Gram
    matrix as extra pseudo-observations, as in collective EASE (Jeunen, Van
    Balen & Goethals, "Closed-Form Models for Collaborative Filtering with
    Side-Information", RecSys 2020):

    .. math::
        \mathbf{P} = \big(\mathbf{X}^\top\mathbf{X} + \textstyle\sum_s \alpha_s
        \mathbf{E}_s\mathbf{E}_s^\top + \lambda\mathbf{I}\big)^{-1},\qquad
        B_{ab} = -P_{ab} / P_{bb},\quad B_{bb} = 0

    Here the side information is the items' text embeddings and the GNN's
    item embeddings (unit rows, see :func:`side_view`), so items bought
    rarely or never still get weights from their text and graph
    neighbourhood, and weights are asymmetric (:math:`B_{ab} \neq B_{ba}`).
    Cost: one dense inversion, :math:`O(n^3)` in the catalog size.

    An item in no order gets only small weights that way (its column is
    explained by its nearest text twin alone), so on a leave-items-out split it
    ranked below plain text cosine. ``cold = (γ, T)`` adds
    :math:`\gamma \max(0, \cos(t_a, t_b))` to the weights towards every item
    :math:`b` without orders. Measured on Online Retail II with text side
    information only, seeds 0–2: HR@10 on held-out items 0.03 → 0.15–0.19 at
    γ = 0.03 with the full test set unchanged; γ = 0.1 lifts held-out items
    further but costs 20 % on the full test set.
    """
    n = baskets.shape[1]
    x = baskets.tocsc().astype(np.float64)
    gram = torch.from_numpy((x.T @ x).toarray()).to(device)
    for weight, e in sides:
        if weight:
            e = e.to(device, torch.float64)
            gram += weight * (e @ e.T)
    gram += lam * torch.eye(n, dtype=torch.float64, device=device)
    p = torch.linalg.inv(gram)
    b = -p / torch.diagonal(p)[None, :]
    if cold is not None and cold[0]:
        unsold = torch.from_numpy(np.asarray(x.sum(0)).ravel() == 0).to(device)
        t = cold[1].to(device, torch.float64)
        b[:, unsold] += cold[0] * (t @ t[unsold].T).clamp(min=0)
    b.fill_diagonal_(0.0)
    return b.float()


def top_rows(weights: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest weights, best first: ``(indices int32, values float32)``, both ``n × k``."""
    k = min(k, weights.size(1) - 1)
    values, indices = weights.topk(k, dim=1)
    return indices.int().cpu().numpy(), values.cpu().numpy()
