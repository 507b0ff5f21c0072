"""Versioned model artifacts: one directory per trained model.

``<model_store>/<version>/`` holds ``model.pt`` (weights), ``manifest.json``
(version, model and training config, encoder id, snapshot id, item ids, ID
table, validation metrics) and the item views the stream worker and API read
without running the GNN: ``item_src.npy``, ``item_dst.npy``, ``item_prior.npy``; with a
decoder (manifest ``decoder``), each item's top decoder weights as
``decoder_index.npy`` (rows into ``item_ids``) and ``decoder_weight.npy``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from training.models import BundleGNN, DecoderConfig

FORMAT_VERSION = 1


@dataclass
class Artifact:
    """A loaded model directory."""

    path: Path
    manifest: dict
    model: BundleGNN
    item_ids: list[str]
    src: np.ndarray
    dst: np.ndarray
    prior: np.ndarray
    decoder_index: np.ndarray | None = None  # item rows × top-k: rows of the decoder's best complements
    decoder_weight: np.ndarray | None = None  # their weights, best first

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def decoder_rows(self) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """``(item ids, indices, weights)`` of the decoder's top complements, for the scorer."""
        if self.decoder_index is None or self.decoder_weight is None:
            return None
        return self.item_ids, self.decoder_index, self.decoder_weight

    @property
    def decoder(self) -> DecoderConfig | None:
        """The decoder's settings (None: the model scores with its cosine head)."""
        found = self.manifest.get("decoder")
        return DecoderConfig(**found) if found else None


def new_version(snapshot_id: str) -> str:
    """A sortable version name: UTC time plus the data snapshot it was trained on."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{snapshot_id[:8]}"


def save_artifact(store_dir: str | os.PathLike[str], version: str, model: BundleGNN, h: dict[str, torch.Tensor],
                  item_ids: list[str], id_items: list[str], manifest: dict,
                  decoder_rows: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write a model directory atomically (a temp dir renamed into place); return its path.

    ``decoder_rows``: :func:`~training.models.top_rows` of the decoder over ``item_ids``, if it has one."""
    final = Path(store_dir) / version
    tmp = Path(store_dir) / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    np.save(tmp / "item_src.npy", h["src"].detach().cpu().numpy())
    np.save(tmp / "item_dst.npy", h["dst"].detach().cpu().numpy())
    np.save(tmp / "item_prior.npy", model.prior(h["item"]).squeeze(-1).detach().cpu().numpy())
    if decoder_rows is not None:
        np.save(tmp / "decoder_index.npy", decoder_rows[0])
        np.save(tmp / "decoder_weight.npy", decoder_rows[1])
    full = {
        "format_version": FORMAT_VERSION,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(),
        "model": {"class": type(model).__name__, "in_channels": model.in_channels,
                  "hidden_channels": model.hidden_channels, "num_layers": model.num_layers,
                  "dropout": model.dropout, "num_ids": model.num_ids, "temperature": model.temperature},
        **manifest,
        "item_ids": item_ids,
        "id_items": id_items,
    }
    (tmp / "manifest.json").write_text(json.dumps(full, indent=1))
    os.replace(tmp, final)
    return final


def artifacts(store_dir: str | os.PathLike[str]) -> list[Path]:
    """The model directories under ``store_dir``, oldest first (versions sort by time)."""
    store = Path(store_dir)
    return sorted(p for p in store.glob("*") if (p / "manifest.json").exists()) if store.is_dir() else []


def latest_artifact(store_dir: str | os.PathLike[str]) -> Path | None:
    """The newest model directory under ``store_dir``, or None."""
    found = artifacts(store_dir)
    return found[-1] if found else None


def prune_artifacts(store_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` (at least one) model directories; return those removed. A process that
    loaded one of them keeps its copy in memory; the newest, which workers and API replicas load, stays."""
    old = artifacts(store_dir)[:-max(1, keep)]
    for path in old:
        shutil.rmtree(path)
    return old


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read a model directory written by :func:`save_artifact`."""
    path = Path(path)
    names = ["manifest.json", "model.pt", "item_src.npy", "item_dst.npy", "item_prior.npy"]
    odd = [name for name in names if not (path / name).is_file()]  # missing, or a FIFO/device a read would block on
    if odd:
        raise ValueError(f"{path}: not a model artifact ({', '.join(odd)} missing or not a regular file)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a model artifact ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: artifact format {manifest.get('format_version')}, this version reads {FORMAT_VERSION}")
    kwargs = {k: v for k, v in manifest["model"].items() if k != "class"}
    model = BundleGNN(**kwargs)
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    rows = (np.load(path / "decoder_index.npy"), np.load(path / "decoder_weight.npy")) if manifest.get("decoder") \
        else (None, None)
    src, dst, prior = (np.load(path / f"item_{name}.npy") for name in ("src", "dst", "prior"))
    n = len(manifest["item_ids"])
    shapes = {"item_src": src.shape, "item_dst": dst.shape, "item_prior": prior.shape}
    if rows[0] is not None:
        shapes.update(decoder_index=rows[0].shape, decoder_weight=rows[1].shape)
    if any(shape[0] != n for shape in shapes.values()) or src.shape != dst.shape or \
            (rows[0] is not None and rows[0].shape != rows[1].shape):
        raise ValueError(f"{path}: the manifest lists {n} items but the arrays have shapes {shapes}")
    return Artifact(path, manifest, model, manifest["item_ids"], src, dst, prior, *rows)
