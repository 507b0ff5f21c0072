"""Knobs of the Kafka side: where the broker is, topic names, the worker's batching."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


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

    def event_kinds(self) -> dict[str, str]:
        """The event topics and the ``type`` of the events each carries (what their messages are parsed as)."""
        return {self.catalog: "item_upserted", self.interactions: "interaction", self.orders: "order"}

    def inputs(self) -> tuple[str, str, str, str]:
        """The worker's input topics: one task per partition number across them."""
        return self.catalog, self.interactions, self.orders, self.repartition

    def layout(self, partitions: int) -> dict[str, int]:
        """Every topic and its partition count (the inputs and bundle-updates: ``stream.partitions``)."""
        return {**{t: partitions for t in self.inputs()}, self.bundle_updates: partitions, self.dead_letters: 1,
                self.model_updates: 1}

    def configs(self) -> dict[str, dict[str, str]]:
        """The Kafka topic configs the system relies on, by topic (a broker's defaults delete records after 7
        days and compact nothing). The event topics and model announcements keep everything: retraining reads
        them from the start, Kafka is the system of record. ``catalog`` and ``bundle-updates`` are compacted:
        an API replica reads them from the start and needs each item's newest record, whatever its age.
        ``repartition`` keeps a week, far longer than a checkpoint interval; dead letters 30 days."""
        keep, compact, day_ms = {"retention.ms": "-1"}, {"cleanup.policy": "compact"}, 86_400_000
        return {self.catalog: compact, self.interactions: keep, self.orders: keep,
                self.repartition: {"retention.ms": str(7 * day_ms)}, self.bundle_updates: compact,
                self.dead_letters: {"retention.ms": str(30 * day_ms)}, self.model_updates: keep}


class KafkaSecurity(BaseModel):
    """How every Kafka client of the project reaches the brokers: TLS and SASL.

    Managed Kafka (Confluent Cloud, Amazon MSK, Aiven, Redpanda Cloud) takes
    only encrypted, authenticated connections; a self-run cluster may require
    mutual TLS. One section configures all clients alike: the worker's Faust
    app and its scoring process (aiokafka), ``replay``, the retraining read of
    the topics, model announcements and the API's view feed (kafka-python).
    The options are the two libraries' common ones (``security_protocol``,
    ``ssl_context``, ``sasl_*``), so both connect the same way.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka's security.protocol: SSL encrypts (and, with a client certificate, "
        "authenticates); SASL_SSL adds a user name and password (what managed Kafka asks for)")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism when protocol is SASL_*")
    sasl_username: str | None = Field(None, description="SASL user (an API key on Confluent Cloud)")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password; set it from the environment (BUNDLEGNN_STREAM__SECURITY__SASL_PASSWORD), "
        "not in a file")
    ssl_cafile: Path | None = Field(None, description="PEM file of the CA that signed the brokers' certificates; "
                                    "unset: the system's trusted CAs")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require mutual "
                                      "TLS (with ssl_keyfile)")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")
    ssl_check_hostname: bool = Field(True, description="check that a broker's certificate names the host "
                                     "connected to")

    @property
    def uses_ssl(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @model_validator(mode="after")
    def _complete(self) -> "KafkaSecurity":
        if self.uses_sasl and not (self.sasl_username and self.sasl_password and self.sasl_password.get_secret_value()):
            raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (a client certificate and its key)")
        files = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, name) is not None]
        if files and not self.uses_ssl:
            raise ValueError(f"{', '.join(files)} set but protocol is {self.protocol}: "
                             "TLS needs protocol SSL or SASL_SSL")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context every client wraps its connections in (None without TLS); files are read now, so a
        missing or unreadable one fails at start with its key's name."""
        if not self.uses_ssl:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"stream.security.ssl_cafile {self.ssl_cafile}: {exc}") from exc
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is not None:
            try:
                context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"stream.security.ssl_certfile/ssl_keyfile {self.ssl_certfile}, "
                                 f"{self.ssl_keyfile}: {exc}") from exc
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for a kafka-python or aiokafka client (both take these names)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_ssl:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            assert self.sasl_password is not None  # checked by _complete
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password.get_secret_value())
        return options


PLAINTEXT = KafkaSecurity()


class StreamConfig(BaseModel):
    """The ``stream:`` section of a config file.

    ``bootstrap_servers: embedded`` makes ``bundlegnn worker``/``replay``
    expect the embedded broker that ``bundlegnn broker`` (or ``make demo``)
    started; it writes its address to ``<state_dir>/broker.addr``.
    """

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field("embedded", description="host:port[,host:port] of Kafka, or 'embedded'")
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    topics: Topics = Field(default_factory=Topics)
    partitions: int = Field(4, ge=1, description="partitions of the event, repartition and bundle-updates topics: "
                            "the tasks the workers share, so at most this many workers do work")
    replication_factor: int = Field(1, ge=1, description="replicas of each topic the project creates (topics that "
                                    "exist are left as they are): 3 on a production cluster, so that losing a "
                                    "broker loses no event")
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

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        """``host:port`` entries, spaces around commas allowed (an environment variable often has them): every
        client gets the same list, without them."""
        if value.strip() == "embedded":
            return "embedded"
        servers = [s.strip() for s in value.split(",")]
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port (servers are host:port[,host:port], or 'embedded')")
        return ",".join(servers)

    @field_validator("signing_key")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None  # "" (an unset variable): unsigned
