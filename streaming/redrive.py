"""Dead letters sent again once they can be applied (``bundlegnn redrive``).

A letter on ``dead-letters`` holds an event as it came (its bytes, key, reason and source topic, partition and
offset in headers). Some become good later: after an upgrade that accepts what an older version refused
(quantities of goods sold by weight, say), or once the clock has passed an event that was dated ahead of it.
The worker's graph never saw them; the retraining reads them from the event topics again anyway.

A run reads the letters in the consumer group ``<stream.app_id>-redrive`` from its committed position (the start
of the topic on a first run) to the end, and sends each letter from an event topic that now parses back to that
topic, with its key, unchanged. The worker judges it as any event: it is applied, or dead-lettered again with its
reason (and a later run sees that letter). Then the run commits what it read, so a letter is sent once: orders
count once by their id and catalog upserts by their time anyway, but an interaction without an ``event_id`` would
count again. ``reason``: send only letters whose reason holds this text (the others are committed too: they were
looked at). ``dry_run``: send and commit nothing, only count.

Guarantees: a run that fails before its commit sends its letters again on the next run (at least once). On tansu,
end offsets come short after multi-record batches, so a run reads on for a second after it reaches them (what
comes later waits for the next run); Apache Kafka's are exact.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from graph.events import Rejected
from streaming.codec import decode
from streaming.settings import KafkaSecurity, Topics


@dataclass
class Redriven:
    """What a run did with the letters it read."""

    read: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # source topic → letters sent back to it
    still_refused: Counter[str] = field(default_factory=Counter)  # why a letter still does not parse → count
    left: Counter[str] = field(default_factory=Counter)  # why a letter was not looked at → count

    def summary(self) -> dict[str, object]:
        return {"read": self.read, "sent": dict(self.sent), "still_refused": dict(self.still_refused),
                "left": dict(self.left)}


def redrive(bootstrap: str, topics: Topics, group: str, security: KafkaSecurity, reason: str | None = None,
            dry_run: bool = False, quiet: float = 1.0) -> Redriven:
    """Send the letters read since the group's last run that now parse back to their event topic (see the
    module's docstring)."""
    kinds = topics.event_kinds()
    options = security.client_options()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", **options)
    producer = None if dry_run else KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all",
                                                  linger_ms=5, **options)
    done = Redriven()
    try:
        found = consumer.partitions_for_topic(topics.dead_letters)
        if not found:
            raise RuntimeError(f"topic {topics.dead_letters!r} does not exist on {bootstrap}")
        parts = [TopicPartition(topics.dead_letters, p) for p in sorted(found)]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        reached: float | None = None  # when the run had read up to the end offsets: it reads on for ``quiet``
        while reached is None or time.monotonic() - reached < quiet:
            polled = consumer.poll(timeout_ms=200)
            if reached is None and all(consumer.position(tp) >= ends[tp] for tp in parts):
                reached = time.monotonic()
            for records in polled.values():
                for record in records:
                    done.read += 1
                    _one(record, kinds, reason, done, producer)
        if producer is not None:
            producer.flush()
            consumer.commit({tp: OffsetAndMetadata(consumer.position(tp), "", -1) for tp in parts})
    finally:
        if producer is not None:
            producer.close()
        consumer.close()
    return done


def _one(record: ConsumerRecord, kinds: dict[str, str], reason: str | None, done: Redriven,
         producer: KafkaProducer | None) -> None:
    """Count one letter, and send it back if it now parses (and ``producer`` is given)."""
    headers = {k: v.decode(errors="replace") for k, v in record.headers or []}
    source, why = headers.get("topic", ""), headers.get("reason", "")
    if source not in kinds:
        done.left[f"not from an event topic ({source or 'no topic header'})"] += 1
    elif "truncated_from" in headers or record.value is None:
        done.left["its value was not kept (over the event size limit)"] += 1
    elif reason is not None and reason not in why:
        done.left["another reason"] += 1
    elif isinstance(event := decode(record.value, kinds[source]), Rejected):
        done.still_refused[event.reason.split(":")[0][:80]] += 1
    else:
        if producer is not None:
            producer.send(source, key=record.key, value=record.value)
        done.sent[source] += 1
