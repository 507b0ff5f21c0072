"""Streaming: the Kafka wire format of events, the producer, topic admin,
the embedded broker launcher and the Faust worker. May import ``graph`` and
``training``."""
