"""Models, one per file: the GNN and the closed-form decoder that scores with its embeddings."""

from training.models.bundle_gnn import Adjacency, BundleGNN
from training.models.decoder import (Decoder, DecoderConfig, decoder_weights, fit_decoder, fit_decoders, side_view,
                                     top_rows)
from training.models.neighbourhood import neighbourhood_fits, neighbourhood_weights

__all__ = ["Adjacency", "BundleGNN", "Decoder", "DecoderConfig", "decoder_weights", "fit_decoder", "fit_decoders",
           "neighbourhood_fits", "neighbourhood_weights", "side_view", "top_rows"]
