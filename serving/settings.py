"""Knobs of the HTTP API (the ``serving:`` section of a config file)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serving.bundles import BundleRules


class ServingConfig(BaseModel):
    """Where the API listens, its bundle rules and how much it keeps in memory."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address the API listens on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port (printed at start)")
    cors_origins: list[str] = Field(default_factory=list, description="origins (scheme://host[:port]) whose pages "
                                    "may call the API from the browser, such as the shop's storefront; '*': any; "
                                    "empty: none (the shop's servers call it)")
    rules: BundleRules = Field(default_factory=BundleRules)
    cache_size: int = Field(100_000, ge=0, description="built responses kept (revalidated on every hit)")
    cache_bytes: int = Field(64 << 20, ge=0, description="and at most this many bytes of them (oldest out first)")
    stale_after: float = Field(60.0, gt=0, description="/healthz fails when the view has been behind its topics "
                                                       "without advancing (or its broker unreachable) this long")
    body_limit: int = Field(64 << 10, ge=1024, description="request bodies over this many bytes get 413")
    max_users: int = Field(100_000, ge=0, description="users whose recent purchases are kept for personalisation")
    seed_top_k: int = Field(20, ge=1, description="model complements per item seeded from the artifact at start")
    switch_interval: float = Field(0.001, gt=0, description="seconds another thread (the view feed, a search) may "
                                   "hold the interpreter before a waiting lookup gets it (Python's default is "
                                   "0.005): in bench/api.py, item bundles' p99 beside 5 searches/s over a "
                                   "215k catalog 8.3 → 5.9 ms")
