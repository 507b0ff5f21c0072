"""Export to torch-geometric HeteroData: node counts, edge types, weights."""

from __future__ import annotations

import torch

from graph.export import CO, IU, UI, to_heterodata


def test_heterodata_shapes_match_the_store(retail_replay) -> None:
    store, _ = retail_replay
    data = to_heterodata(store)
    assert data["item"].num_nodes == store.num_items == 2918
    assert data["user"].num_nodes == store.num_users
    assert set(data.edge_types) == {CO, UI, IU}
    n_co = store.num_co_edges()
    assert data[CO].edge_index.shape == (2, 2 * n_co)
    assert data[CO].edge_weight.shape == (2 * n_co,) and data[CO].edge_weight.dtype == torch.float32
    assert data[UI].edge_index.shape == (2, store.num_ui_edges())
    assert torch.equal(data[IU].edge_index, data[UI].edge_index.flip(0))
    assert int(data[CO].edge_index.max()) < store.num_items
    assert int(data[UI].edge_index[0].max()) < store.num_users
    assert bool((data[CO].edge_weight > 0).all()) and bool((data[CO].edge_count >= 1).all())
    data.validate(raise_on_error=True)


def test_edge_weights_are_read_at_now(retail_replay) -> None:
    store, _ = retail_replay
    later = store.last_ts + store.half_life
    w_now = to_heterodata(store)[CO].edge_weight
    w_later = to_heterodata(store, now=later)[CO].edge_weight
    assert torch.allclose(w_later, w_now / 2, rtol=1e-5)
