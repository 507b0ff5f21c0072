"""Sending events to Kafka with kafka-python, and replaying a dataset as events.

Keys decide partitions: catalog events are keyed by item, interactions by
user, orders by order id (so a cancellation lands on its order's partition).
"""

from __future__ import annotations

import json
import time
from typing import Iterable

from kafka import KafkaProducer
from tqdm import tqdm

from graph.events import Interaction, ItemUpserted, Order
from streaming.codec import encode
from streaming.settings import PLAINTEXT, KafkaSecurity, Topics

Event = ItemUpserted | Interaction | Order


def route(event: Event, topics: Topics) -> tuple[str, bytes]:
    """The topic and key of an event."""
    if isinstance(event, ItemUpserted):
        return topics.catalog, event.item_id.encode()
    if isinstance(event, Interaction):
        return topics.interactions, event.user_id.encode()
    if isinstance(event, Order):
        return topics.orders, event.order_id.encode()
    raise TypeError(f"not an event: {type(event).__name__}")


class EventProducer:
    """A kafka-python producer that knows the topics and keys of events."""

    def __init__(self, bootstrap: str, topics: Topics, security: KafkaSecurity = PLAINTEXT,
                 **kafka_options: object) -> None:
        # acks=all: idempotent, nothing lost on a leader change
        options = {"linger_ms": 5, "acks": "all", **security.client_options(), **kafka_options}
        self.topics = topics
        self.producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), **options)

    def send(self, event: Event) -> None:
        topic, key = route(event, self.topics)
        self.producer.send(topic, key=key, value=encode(event))

    def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Send bytes as they are (tests use it for malformed events)."""
        self.producer.send(topic, key=key, value=value)

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(events: Iterable[Event], producer: EventProducer, rate: float = 0.0, total: int | None = None,
           progress: bool = True) -> int:
    """Send events in order; ``rate`` events per second (0: as fast as possible). Returns the count."""
    started = time.perf_counter()
    sent = 0
    for event in tqdm(events, total=total, desc="replay", unit=" events", disable=None if progress else True):
        if rate > 0:
            ahead = sent / rate - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
        producer.send(event)
        sent += 1
    producer.flush()
    return sent


def publish_model(bootstrap: str, topic: str, path: str, version: str, timeout: float = 30.0,
                  security: KafkaSecurity = PLAINTEXT) -> None:
    """Announce a promoted artifact on ``model-updates``; every worker loads it (raises if Kafka does not ack)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", **security.client_options())
    try:
        producer.send(topic, key=version.encode(), value=json.dumps({"path": path, "version": version}).encode()
                      ).get(timeout=timeout)
    finally:
        producer.close()
