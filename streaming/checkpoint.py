"""Checkpoints: the stream worker's durable state, and the input offsets it reflects, one per task.

The worker's state is partitioned into tasks (:mod:`streaming.repartition`):
task ``p`` is partition ``p`` of the input topics and the graph state of
partition ``p``'s items. Each task has its own checkpoint directory,
``<checkpoints>/task-<p>/``, in a store every worker can read, so a task
that moves to another worker (a rebalance, a worker joining or leaving)
moves through its checkpoint.

A checkpoint is a graph snapshot (:mod:`graph.snapshot`: arrays written,
fsynced and made current by one rename) whose ``extra`` facts say what it
holds, as a Kafka Streams task's checkpoint file does beside its state store:

* ``offsets``: per input-topic partition of the task, the next offset to
  apply — every record before it is in the graph (or went to dead-letters),
  none after;
* ``sources``: per source partition, the newest ``repartition`` record the
  task applied (:class:`streaming.repartition.Sources`);
* ``held``: early cancellations still waiting for their order
  (``stream.cancel_hold``), with the seconds they had left;
* ``pending``: items whose fresh complement list was not yet published;
* ``letters_from``: where the dead-letters topic ended (after the records
  this process delivered): a restart reads the dead letters published since
  and does not publish them again when their records come again.

The worker writes one every ``stream.checkpoint_interval`` seconds or
``stream.checkpoint_events`` events, after its producer has delivered
everything it sent, and on a clean stop. Its consumer commits offsets only
from the current checkpoint, and on (re)assignment seeks to the checkpoint's
offsets (:mod:`streaming.transport`); records the scoring process receives
again are skipped by offset. So a crash at any point resumes from the last
checkpoint: nothing lost, nothing applied twice, and recovery reads one
snapshot plus what came after it, not the whole history.

A record whose application raises (a bug the fuzz tests did not find) must
not put the worker in a crash loop: the failing batch's positions are noted
beside the checkpoint (:func:`note_suspects`) before the process exits;
after the restart that batch is applied one record at a time, and the record
that fails again is noted as poison: the next start dead-letters it with the
error instead of applying it. Two restarts, then the stream goes on.

One scoring process at a time owns a task's checkpoint directory (:func:`own`,
an exclusive ``flock``, held while the task is assigned to it): when the Faust
process is killed, its scoring process still applies what it was handed and
writes a last checkpoint, and the worker that takes the task next waits for
that instead of starting from an older one.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from graph.snapshot import SnapshotError, load_with_extra, read_extra, save, snapshot_id
from graph.store import GraphStore

log = logging.getLogger(__name__)

Position = tuple[str, int]  # (topic, partition)
Source = tuple[str, int, int]  # (topic, partition, offset) of one record
SUSPECTS = "suspects.json"


@dataclass
class Held:
    """A cancellation waiting for its order: where it came from, its raw value, why it waits, seconds left."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None
    reason: str
    seconds_left: float


@dataclass
class Checkpoint:
    """What a checkpoint holds besides the graph."""

    offsets: dict[Position, int] = field(default_factory=dict)
    held: dict[str, Held] = field(default_factory=dict)  # order id → its early cancellation
    pending: dict[str, float] = field(default_factory=dict)  # item → newest source timestamp of its changes
    letters_from: dict[int, int] = field(default_factory=dict)  # dead-letters partition → its end when written
    sources: list[list] = field(default_factory=list)  # see streaming.repartition.Sources.as_json


def task(root: Path, partition: int) -> Path:
    """The checkpoint directory of task ``partition`` under the worker's checkpoint root."""
    return root / f"task-{partition}"


def current_id(path: Path) -> str | None:
    """The id of the current checkpoint under ``path`` (None: none yet)."""
    return snapshot_id(path) if (path / "CURRENT").exists() else None


def own(path: Path, timeout: float = 120.0) -> int:
    """Lock ``path`` for this process (created if need be) and return the lock's file descriptor (the lock lasts
    as long as it is open, or the process lives); waits up to ``timeout`` seconds for another owner to finish."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{path} stayed locked by another scoring process for {timeout:.0f} s") from None
            if not said:
                log.info("waiting for the scoring process that owns %s to finish its checkpoint", path)
                said = True
            time.sleep(0.1)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def write(path: Path, store: GraphStore, state: Checkpoint) -> str:
    """Write a checkpoint of ``store`` and ``state`` under ``path`` atomically; return its id."""
    extra = {
        "offsets": [[topic, partition, offset] for (topic, partition), offset in sorted(state.offsets.items())],
        "held": {order_id: {**h.__dict__, "key": _b64(h.key), "value": _b64(h.value)}
                 for order_id, h in state.held.items()},
        "pending": state.pending,
        "letters_from": {str(p): o for p, o in state.letters_from.items()},
        "sources": state.sources,
        "written_at": time.time(),
        "pid": os.getpid(),
    }
    return save(store, path, extra)


def read(path: Path) -> tuple[GraphStore, Checkpoint] | None:
    """The current checkpoint under ``path``, or None when there is none yet."""
    if not (path / "CURRENT").exists():
        return None
    store, extra = load_with_extra(path)
    return store, _state(extra)


def union(root: Path) -> GraphStore | None:
    """The graph every task's current checkpoint under ``root`` holds together (None: no checkpoint yet): what
    all workers hold, as one store (a worker's stop writes its tasks' last checkpoints)."""
    found = [path for path in sorted(root.glob("task-*")) if (path / "CURRENT").exists()]
    if not found:
        return None
    store = load_with_extra(found[0])[0]
    for path in found[1:]:
        store.adopt(load_with_extra(path)[0])
    return store


def offsets(root: Path) -> dict[Position, int]:
    """The offsets of every task's current checkpoint under ``root``: what the consumer may commit and seeks to."""
    out: dict[Position, int] = {}
    for path in sorted(root.glob("task-*")):
        try:
            out.update(_offsets(read_extra(path)))
        except SnapshotError:
            if (path / "CURRENT").exists():
                raise
    return out


def _offsets(extra: dict) -> dict[Position, int]:
    return {(str(topic), int(partition)): int(offset) for topic, partition, offset in extra.get("offsets", [])}


def _state(extra: dict) -> Checkpoint:
    held = {order_id: Held(**{**h, "key": _unb64(h["key"]), "value": _unb64(h["value"])})
            for order_id, h in extra.get("held", {}).items()}
    return Checkpoint(_offsets(extra), held, {str(k): float(v) for k, v in extra.get("pending", {}).items()},
                      {int(p): int(o) for p, o in extra.get("letters_from", {}).items()}, extra.get("sources", []))


def suspects(path: Path) -> tuple[set[Source], dict[Source, str]]:
    """The records of a batch that failed to apply, and the records that failed alone (with the error)."""
    try:
        noted = json.loads((path / SUSPECTS).read_text())
    except FileNotFoundError:
        return set(), {}
    return ({(str(t), int(p), int(o)) for t, p, o in noted["batch"]},
            {(str(t), int(p), int(o)): str(reason) for t, p, o, reason in noted["poison"]})


def note_suspects(path: Path, batch: set[Source], poison: dict[Source, str]) -> None:
    """Write (or, when both are empty, remove) the suspects file atomically."""
    target = path / SUSPECTS
    if not batch and not poison:
        target.unlink(missing_ok=True)
        return
    tmp = path / f"{SUSPECTS}.tmp"
    tmp.write_text(json.dumps({"batch": sorted(batch), "poison": [[*k, v] for k, v in sorted(poison.items())]}))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
