"""Shared fixtures: the committed real-data file and a graph built from it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from graph.store import GraphConfig, GraphStore
from training.datasets import ImportReport, in_time_order, read_events

DATA = Path(__file__).parent / "data"


def pytest_configure(config: pytest.Config) -> None:
    from graph.store import tune_gc

    tune_gc()  # as the `bundlegnn` command does: the graph's many small objects make default GC slow
#: The whole European subset of Online Retail II (copied from ../shared/data/online_retail_ii).
RETAIL_II = DATA / "online_retail_ii.csv.gz"
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def at(days: float) -> datetime:
    """A timestamp ``days`` after a fixed origin."""
    return T0 + timedelta(days=days)


def retail_events(path: Path = RETAIL_II, report: ImportReport | None = None) -> list:
    """The events of an Online Retail II file in time order (the file is two workbook sheets one after the other)."""
    return in_time_order(read_events(path, report))


@pytest.fixture(scope="session")
def retail_replay() -> tuple[GraphStore, ImportReport]:
    store, report = GraphStore(GraphConfig()), ImportReport()
    store.apply_all(retail_events(RETAIL_II, report))
    return store, report


@pytest.fixture(scope="session")
def broker():
    """A real embedded Kafka-protocol broker (tansu) for the whole session; its bootstrap address."""
    from streaming.broker import EmbeddedBroker

    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap
