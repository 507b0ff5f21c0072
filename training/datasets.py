"""Importing a shop's data: files turned into the events Kafka carries, read as a stream.

``bundlegnn build-graph`` applies these events through
:meth:`graph.store.GraphStore.apply_many` (the code the stream worker runs)
and ``bundlegnn replay`` sends the very same events to Kafka. Two kinds of
file, plain or gzip:

* **JSON lines** (``format: jsonl``): one wire event per line, exactly as
  on the Kafka topics (see README, "Events").
* **CSV** (``format: csv``) through a :class:`CsvMapping` that names the
  column (or ``{column}`` template) of each field; one row per order line.
  The rows with one order id form one order, also where other orders' rows
  come between (``interleaved_rows``: files sorted by time). A shop writes a
  mapping for its own export (``configs/mappings/`` has Online Retail,
  Online Retail II and Complete Journey).

Files are read row by row: memory does not grow with the file's length
(only with its items and users). Events come in file order; the graph
store handles late events exactly inside its order window
(``graph.order_window_days``) and refuses older ones with a reason. A row
that cannot be read becomes a :class:`BadRow` with its line number and the
reason, and the import goes on.
"""
from __future__ import annotations

import fcntl
import heapq
import itertools
import json
import logging
import os
import pickle
import tempfile
import time
import weakref
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, TextIO

from pydantic import BaseModel

from graph.events import Event, Interaction, InteractionFacts, Order, OrderFacts
from graph.store import GraphStore
from training.data_config import BadRow, CatalogColumns, CsvMapping, DataConfig, ImportReport, Sourced
from training.readers import check_columns, csv_events, jsonl_events

if TYPE_CHECKING:
    import multiprocessing

log = logging.getLogger(__name__)

Spooled = Event | OrderFacts | InteractionFacts  # an event as training reads it (a spool gives facts)
_epoch = attrgetter("epoch")  # what events are sorted by

# the configs and reports are defined in training.data_config and the readers in training.readers; this module
# is where an import starts, so it names them too
__all__ = ["BadRow", "CatalogColumns", "CsvMapping", "DataConfig", "ImportReport", "Imported", "Sourced",
           "import_into", "in_time_order", "read_events", "read_source", "read_source_in_process"]


def read_source(cfg: DataConfig, report: ImportReport | None = None, progress: bool = False) -> Iterator[Sourced]:
    """``(line, event or BadRow)`` of the configured file, in file order, read as a stream.

    Raises ``ValueError`` at once, before any row is read, when a file is missing or the mapping names a
    column the file does not have.
    """
    report = report if report is not None else ImportReport()
    for path in (cfg.path, cfg.catalog_path):
        if path is not None and not Path(path).exists():
            raise ValueError(f"dataset not found: {path}")
    if cfg.format == "jsonl":
        return jsonl_events(cfg, report, progress)
    mapping = cfg.csv_mapping()
    if (mapping.catalog is None) != (cfg.catalog_path is None):
        raise ValueError("data.catalog_path and data.mapping's catalog section go together: "
                         + ("data.catalog_path is not set" if cfg.catalog_path is None else
                            "the mapping has no catalog section naming the catalog file's columns"))
    check_columns(cfg, mapping)
    return csv_events(cfg, mapping, report, progress)


def _read_in_process(cfg: DataConfig, queue: multiprocessing.Queue, progress: bool, chunk: int) -> None:
    """A reader process: ``(line, event)`` rows in chunks on ``queue``, orders as their facts, then the report."""
    report = ImportReport()
    rows: list[Sourced] = []
    try:
        for line, event in read_source(cfg, report, progress):
            rows.append((line, event.facts() if isinstance(event, Order) else event))
            if len(rows) >= chunk:
                queue.put(("rows", rows))
                rows = []
        queue.put(("rows", rows))
        queue.put(("done", report))
    except Exception as exc:  # reported to the importing process, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def read_source_in_process(cfg: DataConfig, report: ImportReport, progress: bool = False,
                           chunk: int = 20_000) -> Iterator[Sourced]:
    """:func:`read_source` run in a second process, so reading and applying use both cores; orders come as
    :class:`~graph.events.OrderFacts` (what the graph store takes; cheap to hand between processes).

    A wrong mapping or a missing file raises here, before the process starts.
    """
    import multiprocessing
    import queue as queues

    read_source(cfg, ImportReport())  # checks files and columns now (the generator it returns is not run)
    ctx = multiprocessing.get_context("spawn")
    channel = ctx.Queue(maxsize=4)
    reader = ctx.Process(target=_read_in_process, args=(cfg, channel, progress, chunk), daemon=True,
                         name="bundlegnn-reader")
    reader.start()

    def rows() -> Iterator[Sourced]:
        try:
            while True:
                try:
                    kind, payload = channel.get(timeout=1.0)
                except queues.Empty:
                    if not reader.is_alive():
                        raise RuntimeError(f"the reader process exited with {reader.exitcode}") from None
                    continue
                if kind == "rows":
                    yield from payload
                elif kind == "done":
                    for name in vars(payload):
                        setattr(report, name, getattr(payload, name))
                    return
                else:
                    raise ValueError(payload)
        finally:
            reader.join(5)
            if reader.is_alive():
                reader.terminate()

    return rows()


def read_events(cfg: DataConfig | str | os.PathLike[str], report: ImportReport | None = None,
                progress: bool = False) -> Iterator[Event]:
    """The events of a dataset in file order, bad rows left out (counted in ``report``).

    ``cfg``: a :class:`DataConfig`, or the path of an Online Retail II layout CSV.
    """
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig(path=Path(cfg))
    for _, event in read_source(cfg, report, progress):
        if not isinstance(event, BadRow):
            yield event


class EventSpool:
    """Events written once to a local file, orders and interactions as their facts (:class:`~graph.events.OrderFacts`,
    :class:`~graph.events.InteractionFacts`), and read
    back on every later pass (calling the spool gives a fresh iterator, as :data:`training.protocol.Events`
    asks).

    Training reads its dataset four times (the order check, the time split's two passes, the store of every
    event after training). Parsing the CSV costs about 13 µs a row (Online Retail II full, 1 M rows: 13 s a
    pass; its 40× scale-up, 42.7 M rows: about 9 minutes a pass), reading an order's facts back from a pickle
    about 0.5 µs. The file lives in ``directory`` (the state dir, not a RAM-backed /tmp) and is removed by
    :meth:`close` or when the spool is garbage-collected.

    A job killed meanwhile (an out-of-memory kill, ``kill -9``) leaves its file behind: about 0.5 GB for a 200k-item
    shop's history. Each spool holds a lock on its file while it lives (``flock``, released by the kernel
    when its process dies), and a new spool removes the files in ``directory`` that nobody holds.
    """

    STALE_AFTER = 60.0  # seconds: a younger file may be a spool whose job has not locked it yet

    def __init__(self, directory: Path, chunk: int = 20_000) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="events-", suffix=".spool", dir=directory)
        self.path = Path(name)
        self._lock = os.open(name, os.O_RDONLY)  # held open, and locked, as long as the spool lives
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        self._remove = weakref.finalize(self, _remove_spool, self.path, self._lock)
        self._out: BinaryIO | None = os.fdopen(fd, "wb")
        remove_stale_spools(directory, self.STALE_AFTER)
        self._chunk: list[Spooled] = []
        self.size, self.events = chunk, 0

    def add(self, event: Spooled) -> None:
        """Append one event, an order or interaction as it is or as its facts (only before :meth:`seal`)."""
        if self._out is None:
            raise RuntimeError("the spool is sealed: events are added before it is read")
        self._chunk.append(event.facts() if isinstance(event, (Order, Interaction)) else event)
        self.events += 1
        if len(self._chunk) == self.size:
            pickle.dump(self._chunk, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._chunk = []

    def seal(self) -> "EventSpool":
        """Write what is pending and close the file for writing; the spool can be read from now on."""
        if self._out is not None:
            if self._chunk:
                pickle.dump(self._chunk, self._out, protocol=pickle.HIGHEST_PROTOCOL)
            self._out.close()
            self._out, self._chunk = None, []
        return self

    def __call__(self) -> Iterator[Spooled]:
        if self._out is not None:
            raise RuntimeError("the spool is still being written: seal() it first")
        with self.path.open("rb") as fh:
            while True:
                try:
                    chunk = pickle.load(fh)
                except EOFError:
                    return
                yield from chunk

    def close(self) -> None:
        """Remove the file."""
        if self._out is not None:
            self._out.close()
            self._out = None
        self._remove()

    def in_time_order(self, run: int = 250_000) -> "EventSpool":
        """The same events sorted by time (stably, as :func:`in_time_order` sorts them) in a new sealed spool;
        this one is closed. An external merge sort: runs of ``run`` events are sorted in memory and spooled,
        then merged, so memory holds one run (about 150 MB) while sorting and nothing after, not every event
        for as long as training reads them. A shop's export is seldom in
        time order to the event: Online Retail II's two sheets overlap by 8 days, and a time-sorted export
        gives an order's event after the catalog upserts of the rows that follow its last one. Holding them
        all to sort took 35 MB for Online Retail II full's 60k events (tracemalloc), so about 1.4 GB for its
        40-fold scale-up."""
        directory, runs = self.path.parent, []
        events = self()
        try:
            while chunk := list(itertools.islice(events, run)):
                chunk.sort(key=_epoch)
                spooled = EventSpool(directory, chunk=5_000)  # the merge holds one pickled chunk of each run
                for event in chunk:
                    spooled.add(event)
                runs.append(spooled.seal())
            merged = EventSpool(directory, self.size)
            for event in heapq.merge(*(r() for r in runs), key=_epoch):  # ties: the earlier run's first
                merged.add(event)
            return merged.seal()
        finally:
            for spooled in runs:
                spooled.close()
            self.close()


def _remove_spool(path: Path, lock: int) -> None:
    path.unlink(missing_ok=True)
    os.close(lock)


def remove_stale_spools(directory: Path, older_than: float = EventSpool.STALE_AFTER) -> list[Path]:
    """Remove the spool files in ``directory`` that no living spool holds (left by jobs that were killed) and
    are older than ``older_than`` seconds; return them."""
    removed = []
    for path in directory.glob("events-*.spool"):
        try:
            seen = path.stat()
            if time.time() - seen.st_mtime < older_than:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its job closed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a living job's
            continue
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed %s (%.2f GB), left by a job that stopped before it closed it", path, seen.st_size / 1e9)
    return removed


def in_time_order(events: Iterator[Event] | list[Event]) -> list[Event]:
    """Events sorted by time; equal times keep their order (an item's upsert stays before its order)."""
    return sorted(events, key=_epoch)


@dataclass
class Imported:
    """What :func:`import_into` did: events applied, changed the graph, refused (dead letters)."""

    events: int = 0
    changed: int = 0
    refused: int = 0
    bad_rows: int = 0


def import_into(store: GraphStore, source: Iterator[Sourced], dead_letters: TextIO | None = None,
                origin: Path | None = None, batch: int = 100_000, batch_pairs: int = 30_000_000) -> Imported:
    """Apply a source's events to ``store`` in batches; rows that are not events and events the store refuses
    go to ``dead_letters`` (JSON lines: source, line, reason, raw) with their line number.

    Large batches are cheaper: pairs repeated within a batch are summed before they reach the edge tables
    (Online Retail II ×4: 29 s with 20k events a batch, 20 s with 100k; ×10: 71 s with 15 M pairs a batch,
    54 s with 40 M). ``batch_pairs`` bounds a batch's co-purchase pairs, which bounds the memory its bulk
    update takes (about 40 bytes a pair: ×40 peaked at 11.0 GB with 40 M).
    """
    done = Imported()
    chunk: list[Sourced] = []

    def flush() -> None:
        events = [(line, e) for line, e in chunk if not isinstance(e, BadRow)]
        for line, bad in chunk:
            if isinstance(bad, BadRow):
                done.bad_rows += 1
                if dead_letters is not None:
                    dead_letters.write(bad.as_json(origin or Path("?")) + "\n")
        results = store.apply_many([e for _, e in events])
        done.events += len(events)
        for (line, event), result in zip(events, results):
            done.changed += result.changed
            if result.rejected:
                done.refused += 1
                if dead_letters is not None:
                    raw = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event._asdict())
                    dead_letters.write(BadRow(line, result.note, raw).as_json(origin or Path("?")) + "\n")
        chunk.clear()

    pairs = 0
    for item in source:
        chunk.append(item)
        event = item[1]
        if isinstance(event, (Order, OrderFacts)):
            n = len(event.item_ids)
            pairs += n * (n - 1) // 2
        if len(chunk) >= batch or pairs >= batch_pairs:
            flush()
            pairs = 0
    flush()
    return done
