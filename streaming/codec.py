"""The Kafka wire format: events are UTF-8 JSON objects, one per message.

Decoding never raises on bad input: it returns a :class:`Rejected` value with
the reason and the original bytes, which the worker sends to the dead-letter
topic. The parser itself lives with the schemas (:func:`graph.events.parse_event`)
because JSON-lines imports read the same format.
"""

from __future__ import annotations

from graph.events import AnyEvent, Order, OrderFacts, Rejected, parse_event

__all__ = ["AnyEvent", "Rejected", "decode", "encode", "graph_input"]

decode = parse_event


def encode(event: AnyEvent) -> bytes:
    """The JSON bytes of ``event`` (always with its ``type`` field)."""
    return event.model_dump_json().encode()


def graph_input(event: AnyEvent) -> AnyEvent | OrderFacts:
    """What the worker's scoring process is handed for a decoded event: an order as its facts (cheap to pickle)."""
    return event.facts() if isinstance(event, Order) else event
