"""Knobs of the Kafka side: where the broker is, topic names, the worker's batching."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class Topics(BaseModel):
    """Topic names; events in, bundle lists and dead letters out."""

    model_config = ConfigDict(extra="forbid")

    catalog: str = Field("catalog", description="item_upserted events, keyed by item id (compacted)")
    interactions: str = Field("interactions", description="interaction events, keyed by user id")
    orders: str = Field("orders", description="order events, keyed by order id")
    repartition: str = Field("repartition", description="the workers' own topic: orders, interactions and catalog "
                             "upserts on their way to the worker that owns their items (streaming.repartition)")
    bundle_updates: str = Field("bundle-updates", description="each item's newest complement list, keyed by "
                                "item id (compacted; the API reads it)")
    dead_letters: str = Field("dead-letters", description="events that could not be applied, with the reason "
                              "and source position in headers")
    model_updates: str = Field("model-updates", description="announcements of promoted models")

    def inputs(self) -> tuple[str, str, str, str]:
        """The worker's input topics: one task per partition number across them."""
        return self.catalog, self.interactions, self.orders, self.repartition

    def layout(self, partitions: int) -> dict[str, int]:
        """Every topic and its partition count (the inputs and bundle-updates: ``stream.partitions``)."""
        return {**{t: partitions for t in self.inputs()}, self.bundle_updates: partitions, self.dead_letters: 1,
                self.model_updates: 1}


class StreamConfig(BaseModel):
    """The ``stream:`` section of a config file.

    ``bootstrap_servers: embedded`` makes ``bundlegnn worker``/``replay``
    expect the embedded broker that ``bundlegnn broker`` (or ``make demo``)
    started; it writes its address to ``<state_dir>/broker.addr``.
    """

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field("embedded", description="host:port[,host:port] of Kafka, or 'embedded'")
    topics: Topics = Field(default_factory=Topics)
    partitions: int = Field(4, ge=1, description="partitions of the event, repartition and bundle-updates topics: "
                            "the tasks the workers share, so at most this many workers do work")
    app_id: str = Field("bundlegnn", description="Faust app id: the consumer group")
    batch_size: int = Field(2000, ge=1, description="events per micro-batch (stream.take)")
    batch_within: float = Field(0.05, gt=0, description="seconds a micro-batch waits to fill")
    fetch_max_wait: float = Field(0.05, gt=0, le=30, description="longest a consumer fetch waits for data (s): "
                                  "bounds how long an event can sit on the broker unseen")
    refresh_interval: float = Field(0.05, gt=0, description="shortest pause between two refreshes of touched "
                                    "items' complement lists (s)")
    refresh_share: float = Field(0.3, gt=0, le=1, description="most of the scoring process's time refreshes may "
                                 "take while events wait: under load the pause grows to keep it there")
    embed_interval: float = Field(2.0, gt=0, description="seconds between inductive passes for new items")
    session_timeout: float = Field(10.0, gt=0, description="consumer session timeout (s); small joins fast")
    heartbeat_interval: float = Field(1.0, gt=0, description="consumer heartbeat (s)")
    max_poll_interval: float = Field(300.0, gt=0, description="longest stall between polls before the worker "
                                     "is dropped from its group (keep it large: tansu never lets it back in)")
    rebalance_timeout: float = Field(10.0, gt=0, description="a consumer-group join waits this long on tansu")
    web_port: int = Field(0, ge=0, le=65535, description="Faust's own web port; 0 disables it")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics of the worker; 0 disables it")
    metrics_interval: float = Field(5.0, gt=0, description="seconds between consumer-lag measurements")
    checkpoint_interval: float = Field(10.0, gt=0, description="seconds between two checkpoints of the worker's "
                                       "state while events come in: what a crash re-reads from the topics")
    checkpoint_events: int = Field(500_000, ge=1, description="records taken that call for a checkpoint sooner")
    cancel_hold: float = Field(60.0, ge=0, description="seconds a cancellation of an order not yet seen waits "
                               "for that order before it goes to dead-letters (the graph records it at once: the "
                               "late order is ignored either way); 0: at once")
    signing_key: SecretStr | None = Field(
        None, description="shared secret the worker signs bundle-updates records with (HMAC-SHA256, header "
        "'signature') and the API checks: records without a valid signature are not served. Set it from the "
        "environment (BUNDLEGNN_STREAM__SIGNING_KEY), not in a file; unset, anyone who can write to the topic "
        "decides what the API serves")
    encode_text: bool = Field(True, description="embed new items' text in the worker (loads the encoder)")

    def signing_secret(self) -> bytes | None:
        """The signing key's bytes (None: bundle updates are not signed)."""
        return self.signing_key.get_secret_value().encode() if self.signing_key is not None else None

    @field_validator("signing_key")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None  # "" (an unset variable): unsigned
