"""GNN models, one per file."""

from training.models.bundle_gnn import BundleGNN

__all__ = ["BundleGNN"]
