"""bundlegnn: the composition root that wires graph, training, streaming and
serving into the ``bundlegnn`` command."""

__version__ = "0.1.0"
