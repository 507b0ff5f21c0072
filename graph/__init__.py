"""The graph store: id maps, item catalog, time-decayed co-purchase and
user–item edges, incremental updates from events, snapshots and export to
torch-geometric. Imports no other bundlegnn package."""

from graph.events import Event, Interaction, ItemUpserted, Order, OrderLine
from graph.store import Applied, GraphConfig, GraphStore

__all__ = ["Applied", "Event", "GraphConfig", "GraphStore", "Interaction", "ItemUpserted", "Order", "OrderLine"]
