"""Training: dataset adapters, text encoder, GNN models, training loop,
evaluation protocol, baselines and model artifacts. May import ``graph``."""
