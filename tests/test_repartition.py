"""The order → item repartition's records: what a task sends, and what a receiving task skips."""

from __future__ import annotations

from graph.events import Interaction, ItemUpserted, Order, OrderLine, Rejected
from graph.store import ROUTED, GraphConfig, GraphStore
from streaming.repartition import Sources, decode, item_partition, outputs
from tests.conftest import at


def test_items_are_partitioned_as_kafka_s_default_partitioner_places_their_keys() -> None:
    from aiokafka.partitioner import DefaultPartitioner  # what the worker's producers use

    for item in ["85123A", "22423", "POST", "ä-ö", "x" * 300]:
        expected = DefaultPartitioner()(item.encode(), list(range(6)), list(range(6)))
        assert item_partition(item, 6) == expected


def test_an_order_s_shares_reach_the_other_partitions_and_apply_there_once() -> None:
    parts = 3
    items = [f"i{k}" for k in range(12)]
    order = Order(order_id="o1", user_id="u", items=[OrderLine(item_id=i) for i in items], ts=at(1))
    home = item_partition("o1", parts)
    sender = GraphStore(GraphConfig(), partition_of=lambda i: item_partition(i, parts))
    applied = sender.apply_many([order.facts()], [home])[0]
    sent = outputs("orders", home, 41, order.facts(), parts, applied.change)
    targets = {item_partition(i, parts) for i in items} - {home}
    assert sorted(o.partition for o in sent) == sorted(targets) and len(targets) == 2
    for out in sent:
        assert item_partition(out.key.decode(), parts) == out.partition  # keyed by an item of its partition
    receivers = {q: GraphStore(GraphConfig(), partition_of=lambda i: item_partition(i, parts)) for q in targets}
    sources = {q: Sources() for q in targets}
    for out in sent + sent:  # the sender restarted from an older checkpoint: everything again
        source, event = decode(out.value)
        assert source[:3] == ("orders", home, 41)
        if sources[out.partition].fresh(source):
            receivers[out.partition].apply_many([event], [ROUTED])
    for q, store in receivers.items():
        mine = [i for i in items if item_partition(i, parts) == q]
        assert store.item_order_counts()[[store.items.index[i] for i in mine]].tolist() == [1] * len(mine)
        assert store.co_purchase(mine[0], "i0" if mine[0] != "i0" else "i1").count == 1
    assert Sources.from_json(sources[min(targets)].as_json()).newest == sources[min(targets)].newest


def test_interactions_go_to_their_item_s_partition_and_catalog_upserts_to_every_other() -> None:
    click = Interaction(user_id="u", item_id="i5", kind="view", ts=at(1), event_id="e1")
    home = (item_partition("i5", 4) + 1) % 4
    (out,) = outputs("interactions", home, 7, click, 4)
    source, event = decode(out.value)
    assert out.partition == item_partition("i5", 4) and event.event_id is None and source == ("interactions", home, 7, 0)
    assert outputs("interactions", item_partition("i5", 4), 7, click, 4) == []  # its own partition's item
    upsert = ItemUpserted(item_id="i5", title="mug", ts=at(0))
    sent = outputs("catalog", 2, 3, upsert, 4)
    assert [o.partition for o in sent] == [0, 1, 3] and [decode(o.value)[0][3] for o in sent] == [0, 1, 2]
    assert isinstance(decode(b'{"source": ["x"], "event": {}}'), Rejected)
    assert isinstance(decode(None), Rejected)
