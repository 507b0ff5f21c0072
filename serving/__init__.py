"""Serving: bundle construction (set scoring, constraints, explanations) and
the HTTP API. May import ``graph`` and ``training``."""
