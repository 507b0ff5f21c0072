"""Reading the event topics from the beginning: the retraining job's view of the whole graph.

Kafka is the system of record: every event the stream worker applied is on
``catalog``, ``interactions`` and ``orders``, so a replay of those topics up to
their current end offsets is the graph as it stands. Events that fail
validation are skipped and counted (the worker already dead-lettered them).

A shop of 200k items has years of orders on those topics (42.7 M order lines
in the 40-fold Online Retail II), so the events are not held as parsed
objects: each order and interaction is kept as its facts, with the item and
user ids shared between them, while they are sorted by time, and then
written to an :class:`~training.datasets.EventSpool` that training reads on
each pass, as it reads a dataset file.
"""

from __future__ import annotations

import logging
import time
from sys import intern
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from graph.events import Interaction, InteractionFacts, Order, OrderFacts
from streaming.codec import AnyEvent, Rejected, decode
from streaming.settings import PLAINTEXT, KafkaSecurity, Topics
from training.datasets import EventSpool

log = logging.getLogger(__name__)


def read_events(bootstrap: str, topics: Topics, spool_dir: Path, stall: float = 300.0,
                security: KafkaSecurity = PLAINTEXT) -> tuple[EventSpool, int]:
    """Every valid event on the event topics up to their end offsets as the call begins, in time order, in a
    spool under ``spool_dir`` (orders and interactions as their facts), and the number of rejected messages.

    ``stall``: seconds without a record before the read gives up (a broker that stopped answering); a read
    that goes on receiving records may take as long as the topics need. The end offsets are taken as Kafka
    reports them: tansu, the embedded broker, reports them short after multi-record batches, so there the
    read can stop a few records early (0.4 % of Online Retail II full's events); Apache Kafka's are exact.
    """
    kinds = topics.event_kinds()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_bytes=64 << 20,
                             max_partition_fetch_bytes=16 << 20, **security.client_options())
    rank = {name: n for n, name in enumerate(kinds)}
    keyed: list[tuple[float, int, int, int, AnyEvent | OrderFacts | InteractionFacts]] = []
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
        heard = time.monotonic()
        while todo:
            polled = consumer.poll(timeout_ms=500, max_records=20_000)
            if polled:
                heard = time.monotonic()
            elif time.monotonic() - heard > stall:
                raise TimeoutError(f"no record from the event topics for {stall:.0f} s; {len(todo)} partitions "
                                   f"unfinished")
            for tp, records in polled.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue  # written after the job started: the next run takes it
                    event = decode(record.value, kinds[tp.topic])
                    if isinstance(event, Rejected):
                        rejected += 1
                        continue
                    kept: AnyEvent | OrderFacts | InteractionFacts = event
                    if isinstance(event, Order):  # its facts, with one string per item and user id (interned)
                        facts = event.facts()
                        kept = facts._replace(user_id=facts.user_id and intern(facts.user_id),
                                              item_ids=tuple(map(intern, facts.item_ids)))
                    elif isinstance(event, Interaction):
                        facts_i = event.facts()
                        kept = facts_i._replace(user_id=intern(facts_i.user_id), item_id=intern(facts_i.item_id))
                    keyed.append((event.epoch, rank[tp.topic], tp.partition, record.offset, kept))
            todo = {tp: end for tp, end in todo.items() if consumer.position(tp) < end}
    finally:
        consumer.close()
    # Time order; equal times by topic, partition and offset, so the result never depends on how polls
    # interleaved partitions (training is then reproducible) and a cancellation stays after its placement.
    keyed.sort(key=lambda k: k[:4])
    spool = EventSpool(spool_dir)
    for *_, event in keyed:
        spool.add(event)
    del keyed
    log.info("read %d events from %s (%d rejected)", spool.events, ", ".join(kinds), rejected)
    return spool.seal(), rejected
