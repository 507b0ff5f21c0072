"""Models, one per file: the GNN and the closed-form decoder that scores with its embeddings."""

from training.models.bundle_gnn import BundleGNN
from training.models.decoder import DecoderConfig, decoder_weights, side_view, top_rows

__all__ = ["BundleGNN", "DecoderConfig", "decoder_weights", "side_view", "top_rows"]
