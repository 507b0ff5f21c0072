"""The stream worker's Prometheus metrics (served by its scoring process on ``stream.metrics_port``).

Throughput is a counter (Prometheus takes the rate); consumer lag is the
number of messages on the worker's partitions not yet handed to its
scoring process;
refresh latency is the time from an event's produce timestamp to its item's
new list on ``bundle-updates``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """One worker's metrics in a registry of their own (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("bundlegnn_worker_events", "Events from the input topics applied to the graph "
                              "(dead letters not counted)", ["kind"], registry=r)
        for kind in ("item_upserted", "interaction", "order"):  # present from the start, so rates begin at 0
            self.events.labels(kind)
        self.routed = Counter("bundlegnn_worker_routed", "Repartition records applied: other tasks' shares of "
                              "their events (an order's pairs of this task's items; every catalog entry, which "
                              "every task keeps)", ["kind"], registry=r)
        self.dead_letters = Counter("bundlegnn_worker_dead_letters", "Messages sent to the dead-letter topic",
                                    ["topic"], registry=r)
        self.publish_failures = Counter("bundlegnn_worker_publish_failures", "Bundle updates and dead letters "
                                        "Kafka refused (each one is logged)", ["topic"], registry=r)
        self.updates = Counter("bundlegnn_worker_bundle_updates", "Complement lists published", registry=r)
        self.lag = Gauge("bundlegnn_worker_consumer_lag", "Messages on assigned partitions not yet handed to the "
                         "scoring process (which applies them in order)",
                         ["topic"], registry=r)
        self.refresh_seconds = Histogram("bundlegnn_worker_refresh_seconds",
                                         "Time to score and publish the items touched since the last tick",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.event_to_update = Histogram("bundlegnn_worker_event_to_update_seconds",
                                         "Event produced to its item's list published", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.checkpoint_seconds = Histogram("bundlegnn_worker_checkpoint_seconds", "Time to write a checkpoint "
                                            "(flush the producer, write and fsync the state, rename)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.pending = Gauge("bundlegnn_worker_pending_items", "Items touched by applied events whose lists are not "
                             "yet handed to the producer (0 with no consumer lag: the worker is idle)", registry=r)
        self.items = Gauge("bundlegnn_worker_items", "Items in the worker's graph", registry=r)
        self.co_edges = Gauge("bundlegnn_worker_co_purchase_edges", "Co-purchase pairs in the worker's graph",
                              registry=r)
        self.models_refused = Counter("bundlegnn_worker_models_refused", "model-updates announcements refused "
                                      "(the live model stayed)", registry=r)
        self.model_loaded = Gauge("bundlegnn_worker_model_loaded_timestamp", "Unix time the current model was loaded "
                                  "(0: no model, scoring from co-purchase statistics and text)", registry=r)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and the benchmark."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
