"""The order → item repartition: how several workers share one graph through Kafka.

The graph's state is partitioned by item (:class:`graph.store.GraphStore`'s
``partition_of``): item ``i`` belongs to partition :func:`item_partition`
of its id, the partition Kafka's default partitioner gives a record keyed
by it. Partition ``p`` of every input topic (``catalog``, ``interactions``,
``orders``, ``repartition``: all have ``stream.partitions`` partitions) is one
*task*, as in Kafka Streams, and the consumer group gives each task to one
worker. Task ``p`` holds the rows, counts and user–item edges of partition
``p``'s items and the order and interaction logs of its input partitions.

An order on ``orders`` partition ``p`` (keyed by order id) is decided there —
placed, a repeat, a take-back — and applied to partition ``p``'s items; its
change for the items of every other partition ``q`` goes to ``repartition``
partition ``q`` as an :class:`~graph.events.OrderShare`, keyed by one of
those items. An interaction whose item lies in another partition is
forwarded the same way, and a catalog upsert goes to every other partition
(every task keeps the whole catalog: complements of an item are items of
any partition).

Exactly once across crashes and moves: a record on ``repartition`` carries
its source — the input record's topic, partition and offset, and its number
among that record's outputs. A task that restarts from its checkpoint
produces the same outputs again for the records after it (its decisions
depend only on its checkpointed state and its input); the receiving task
keeps, per source partition, the newest source it applied
(:class:`Sources`, checkpointed with it) and skips what is not newer.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from kafka.partitioner import murmur2

from graph.events import Interaction, ItemUpserted, OrderFacts, OrderShare, Rejected

Source = tuple[str, int, int, int]  # (topic, partition, offset, n-th output of that record)
Routed = OrderShare | Interaction | ItemUpserted


def item_partition(item_id: str, partitions: int) -> int:
    """The partition of an item: Kafka's default partitioner on its id (murmur2, as the Java client)."""
    return (murmur2(item_id.encode()) & 0x7FFFFFFF) % partitions


class Output(NamedTuple):
    """A record for ``repartition``: its partition, key (the item: for an order's share, its first item in that
    partition) and value."""

    partition: int
    key: bytes
    value: bytes


def outputs(topic: str, partition: int, offset: int, event: OrderFacts | Routed, partitions: int,
            change: OrderFacts | None = None) -> list[Output]:
    """What task ``partition`` sends other tasks for the input record at ``offset`` once applied: an order's
    shares (``change``: see :attr:`graph.store.Applied.change`), an interaction with another partition's item,
    a catalog upsert to every other partition. Numbered in a fixed order, so a replay numbers them alike."""
    if change is not None:
        first: dict[int, str] = {}
        for item in change.item_ids:
            first.setdefault(item_partition(item, partitions), item)
        targets = sorted(q for q in first if q != partition)
        bodies = [({"type": "order_share", **share._asdict()}, first[share.partition])
                  for share in change.shares(targets)]
    elif isinstance(event, Interaction):
        q = item_partition(event.item_id, partitions)
        targets = [q] if q != partition else []
        bodies = [({**json.loads(event.model_dump_json()), "event_id": None}, event.item_id)] * len(targets)
    elif isinstance(event, ItemUpserted):
        targets = [q for q in range(partitions) if q != partition]
        bodies = [(json.loads(event.model_dump_json()), event.item_id)] * len(targets)
    else:
        return []
    return [Output(q, key.encode(), json.dumps({"source": [topic, partition, offset, n], "event": body}).encode())
            for n, (q, (body, key)) in enumerate(zip(targets, bodies))]


def decode(value: bytes | None) -> tuple[Source, Routed] | Rejected:
    """A ``repartition`` record's source and event; a record this project did not write is rejected."""
    try:
        obj = json.loads(value or b"null")
        topic, partition, offset, n = obj["source"]
        body = obj["event"]
        kind = body.pop("type")
        if kind == "order_share":
            event: Routed = OrderShare(str(body["order_id"]), body["user_id"], float(body["epoch"]),
                                       tuple(map(str, body["item_ids"])), int(body["sign"]), int(body["partition"]))
        elif kind == "interaction":
            event = Interaction.model_validate(body)
        elif kind == "item_upserted":
            event = ItemUpserted.model_validate(body)
        else:
            raise ValueError(f"unknown event type {kind!r}")
        return (str(topic), int(partition), int(offset), int(n)), event
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return Rejected(f"not a repartition record: {type(exc).__name__}: {exc}"[:500], (value or b"")[:1024])


class Sources:
    """Per source partition, the newest source a task applied from ``repartition``: a record not newer is a
    copy its sender produced again after restarting from its checkpoint."""

    def __init__(self, newest: dict[tuple[str, int], tuple[int, int]] | None = None) -> None:
        self.newest = dict(newest or {})

    def fresh(self, source: Source) -> bool:
        """Whether ``source`` is newer than every one applied from its partition (then it counts as applied)."""
        at, position = source[:2], source[2:]
        if position <= self.newest.get(at, (-1, -1)):
            return False
        self.newest[at] = position
        return True

    def as_json(self) -> list[list]:
        return [[t, p, o, n] for (t, p), (o, n) in sorted(self.newest.items())]

    @classmethod
    def from_json(cls, rows: list[list]) -> Sources:
        return cls({(str(t), int(p)): (int(o), int(n)) for t, p, o, n in rows})
