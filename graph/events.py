"""The events that change the graph: catalog upserts, interactions and orders.

These schemas are the one contract shared by the dataset replay, the Kafka
wire format (``streaming.codec``) and :meth:`graph.store.GraphStore.apply`.
They live in ``graph`` because it is the lowest layer: every other package
may import it, and it imports none of them.

Timestamps without a timezone are read as UTC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Iterable, Literal, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

NonEmpty = Annotated[str, Field(min_length=1, max_length=256)]


EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the Unix epoch: catalog files without times use it


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    ts: datetime

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        if value < EARLIEST:  # the upper bound is the graph store's (graph.max_future_days after its clock)
            raise ValueError(f"{value.isoformat()} is before {EARLIEST.date().isoformat()}, the earliest time accepted")
        return value

    @property
    def epoch(self) -> float:
        """Event time in seconds since the Unix epoch."""
        return self.ts.timestamp()


class ItemUpserted(_Event):
    """A catalog item was created or changed (title, text, price, stock)."""

    type: Literal["item_upserted"] = "item_upserted"
    item_id: NonEmpty
    title: Annotated[str, Field(min_length=1, max_length=1000)]
    description: Annotated[str, Field(max_length=20_000)] = ""
    category: NonEmpty | None = None
    price: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    in_stock: bool = True


class Interaction(_Event):
    """A user looked at, carted or bought an item (one user–item edge update)."""

    type: Literal["interaction"] = "interaction"
    user_id: NonEmpty
    item_id: NonEmpty
    kind: Literal["view", "cart", "purchase"]
    event_id: NonEmpty | None = Field(None, description="the producer's id of this interaction: sent twice inside "
                                      "the order window it counts once (without one, every copy counts)")

    def facts(self) -> InteractionFacts:
        """What the graph takes from this interaction."""
        return InteractionFacts(self.user_id, self.item_id, self.kind, self.epoch, self.event_id)


class InteractionFacts(NamedTuple):
    """What the graph takes from an :class:`Interaction` (the graph store applies either), as plain values.

    The retraining job holds every interaction on the topics while it sorts
    them by time: a shop sends many views for each order, and a parsed
    Interaction takes about 1.2 KB of memory, these a tenth of it.
    """

    user_id: str
    item_id: str
    kind: str  # "view", "cart" or "purchase"
    epoch: float  # seconds since the Unix epoch
    event_id: str | None

    @property
    def type(self) -> str:
        return "interaction"


class OrderLine(BaseModel):
    """One line of an order. Quantities are positive; a return is a cancelled order.

    A quantity may be a fraction: goods sold by weight or length (0.35 kg of
    apples) are bought as much as goods sold by the piece. The graph counts
    the line, not its quantity.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    item_id: NonEmpty
    quantity: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0  # (int | float: +50 % validation time)
    price: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class Order(_Event):
    """A placed order, or the cancellation of an earlier one.

    ``status="placed"`` adds one co-purchase count to every pair of distinct
    items in the order and a purchase edge from the user to each item.
    ``status="cancelled"`` takes the contribution of the placed order with the
    same ``order_id`` back out; a cancellation of an order the graph never saw
    changes no edge (it is counted, see ``GraphStore.stats``).
    """

    type: Literal["order"] = "order"
    order_id: NonEmpty
    user_id: NonEmpty | None = None
    items: Annotated[list[OrderLine], Field(min_length=1, max_length=10_000)]
    status: Literal["placed", "cancelled"] = "placed"

    @property
    def item_ids(self) -> list[str]:
        """Distinct item ids in first-seen order."""
        return list(dict.fromkeys(line.item_id for line in self.items))

    def facts(self) -> OrderFacts:
        """What the graph takes from this order."""
        return OrderFacts(self.order_id, self.user_id, self.epoch, tuple(self.item_ids), self.status)


class OrderFacts(NamedTuple):
    """What the graph takes from an :class:`Order` (the graph store applies either), as plain values.

    The stream worker's Faust process validates orders and hands these to its
    scoring process: pickled, an Order of Online Retail II takes about 100 µs
    to load (one object per line), these 0.5 µs, and decoding the JSON again
    took a sixth of the scoring process's time.
    """

    order_id: str
    user_id: str | None
    epoch: float  # seconds since the Unix epoch
    item_ids: tuple[str, ...]  # distinct, in first-seen order
    status: str  # "placed" or "cancelled"

    @property
    def type(self) -> str:
        return "order"

    def shares(self, partitions: Iterable[int]) -> list[OrderShare]:
        """This order's change for the items of each of ``partitions`` (see :class:`OrderShare`)."""
        sign = -1 if self.status == "cancelled" else 1
        return [OrderShare(self.order_id, self.user_id, self.epoch, self.item_ids, sign, p) for p in partitions]


class OrderShare(NamedTuple):
    """An order's change to the graph for the items of one partition: what the order → item repartition carries.

    The graph's state is partitioned by item (the stream worker's item
    partitions): a partition's store keeps its items' rows of co-purchases,
    their order counts and their user–item edges, so all partitions'
    stores together hold the graph one store builds. The store that sees an
    order (its order partition's) decides what it changes — a placement,
    a take-back, nothing for a repeat — applies that to its own items and
    sends each other partition holding some of the order's items one of
    these (:attr:`graph.store.Applied.change`): the owner adds, for each of
    its items ``a`` in ``item_ids``, ``a``–``b`` for every other ``b`` to
    ``a``'s row only. ``epoch`` is the placed order's time, also when it is
    taken back (``sign`` -1).
    """

    order_id: str
    user_id: str | None
    epoch: float
    item_ids: tuple[str, ...]
    sign: int  # +1 placed, -1 taken back
    partition: int  # the items whose rows change: those of this partition

    @property
    def type(self) -> str:
        return "order_share"


Event = Annotated[Union[ItemUpserted, Interaction, Order], Field(discriminator="type")]
EVENT_TYPES: dict[str, type[_Event]] = {
    "item_upserted": ItemUpserted,
    "interaction": Interaction,
    "order": Order,
}


AnyEvent = ItemUpserted | Interaction | Order
_any_event: TypeAdapter[AnyEvent] = TypeAdapter(Event)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input that is not a valid event, with a reason a person can act on."""

    reason: str
    raw: bytes


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


MAX_EVENT_BYTES = 1 << 20  # an event is a few hundred bytes; an order of 1,000 lines about 60 KB


def parse_event(raw: bytes | str | None, expected: str | None = None) -> AnyEvent | Rejected:
    """Parse one JSON event (a Kafka message, a line of a JSON-lines file); never raises on bad input.

    ``expected`` (an event ``type``) is what the topic carries: with it the
    ``type`` field may be left out, and a different ``type`` is rejected.
    Without it, ``type`` decides the schema. A null value (a Kafka
    tombstone), more than :data:`MAX_EVENT_BYTES` or JSON nested too deeply
    to parse are rejected with that reason.
    """
    if raw is None:
        return Rejected("a null message value (a tombstone): no event", b"")
    data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else bytes(raw)
    if len(data) > MAX_EVENT_BYTES:
        return Rejected(f"{len(data):,} bytes: an event is at most {MAX_EVENT_BYTES:,} bytes", data[:1024])
    if expected is not None:
        try:  # the common case, parsed and validated in one pass (half the time of json.loads + validate)
            return EVENT_TYPES[expected].model_validate_json(data)
        except ValidationError:
            pass  # not valid: the path below says why in the words of the checks it failed
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejected(f"not JSON: {exc}", data)
    except RecursionError:
        return Rejected("JSON nested too deeply to be an event", data[:1024])
    if not isinstance(obj, dict):
        return Rejected(f"not a JSON object but {type(obj).__name__}", data)
    try:
        if expected is None:
            return _any_event.validate_python(obj)
        if obj.get("type", expected) != expected:
            return Rejected(f"type {obj.get('type')!r} on a topic for {expected!r} events", data)
        return EVENT_TYPES[expected].model_validate(obj)
    except ValidationError as exc:
        return Rejected(_reason(exc), data)
