"""Reading the event topics from the beginning: the retraining job's view of the whole graph.

Kafka is the system of record: every event the stream worker applied is on
``catalog``, ``interactions`` and ``orders``, so a replay of those topics up to
their current end offsets is the graph as it stands. Events that fail
validation are skipped and counted (the worker already dead-lettered them).
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition

from streaming.codec import AnyEvent, Rejected, decode
from streaming.settings import Topics

log = logging.getLogger(__name__)


def read_events(bootstrap: str, topics: Topics, timeout: float = 600.0) -> tuple[list[AnyEvent], int]:
    """All valid events on the event topics in time order, and the number of rejected messages."""
    kinds = {topics.catalog: "item_upserted", topics.interactions: "interaction", topics.orders: "order"}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_bytes=64 << 20,
                             max_partition_fetch_bytes=16 << 20)
    rank = {name: n for n, name in enumerate(kinds)}
    keyed: list[tuple[float, int, int, int, AnyEvent]] = []
    rejected = 0
    try:
        parts = [TopicPartition(t, p) for t in kinds for p in sorted(consumer.partitions_for_topic(t) or ())]
        missing = sorted(set(kinds) - {tp.topic for tp in parts})
        if missing:
            raise RuntimeError(f"topics {missing} do not exist on {bootstrap}")
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        todo = {tp: end for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the event topics took longer than {timeout:.0f} s; "
                                   f"{len(todo)} partitions unfinished")
            for tp, records in consumer.poll(timeout_ms=500, max_records=20_000).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue  # written after the job started: the next run takes it
                    event = decode(record.value, kinds[tp.topic])
                    if isinstance(event, Rejected):
                        rejected += 1
                    else:
                        keyed.append((event.epoch, rank[tp.topic], tp.partition, record.offset, event))
            todo = {tp: end for tp, end in todo.items() if consumer.position(tp) < end}
    finally:
        consumer.close()
    # Time order; equal times by topic, partition and offset, so the result never depends on how polls
    # interleaved partitions (training is then reproducible) and a cancellation stays after its placement.
    keyed.sort(key=lambda k: k[:4])
    events = [k[4] for k in keyed]
    log.info("read %d events from %s (%d rejected)", len(events), ", ".join(kinds), rejected)
    return events, rejected
