"""Settings: a YAML file, then ``BUNDLEGNN_...`` environment variables on top.

Nested keys use ``__`` in variable names, e.g. ``BUNDLEGNN_GRAPH__HALF_LIFE_DAYS=30``.
Unknown keys and bad values fail at start with the offending key named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bundlegnn.logs import LogConfig
from graph.store import GraphConfig
from serving.settings import ServingConfig
from streaming.settings import StreamConfig
from training.complements import ScorerConfig
from training.encoder import EncoderConfig
from training.promote import PromotionConfig
from training.data_config import DataConfig
from training.train import TrainConfig


class PathsConfig(BaseModel):
    """Where the project writes its state."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Field(Path("var"), description="local state: graph snapshot, checkpoints, text cache, "
                            "broker and API addresses, dead-letter files")
    model_store: Path = Field(Path("var/models"), description="where `train` writes model versions and workers "
                              "and the API load them (shared in production)")
    keep_models: int = Field(5, ge=1, description="model versions `train` keeps in the model store, the newest "
                             "(older ones are removed after a new one is written; a version takes about 4 KB an "
                             "item): the live one and a few to roll back to")

    @property
    def snapshot(self) -> Path:
        """The graph snapshot directory (see :mod:`graph.snapshot`)."""
        return self.state_dir / "graph"

    @property
    def import_dead_letters(self) -> Path:
        """Where ``build-graph`` and ``replay`` write the rows and events they could not use (JSON lines)."""
        return self.state_dir / "import-dead-letters.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The stream workers' checkpoints (see :mod:`streaming.checkpoint`): one directory per task, on a volume
        every worker mounts and that outlives them (a task moves between workers through it); it belongs to the
        topics it was read from."""
        return self.state_dir / "checkpoint"

    @property
    def text_cache(self) -> Path:
        return self.state_dir / "cache" / "text"

    @property
    def broker_address(self) -> Path:
        """Where ``bundlegnn broker`` writes the embedded broker's host:port."""
        return self.state_dir / "broker.addr"

    @property
    def api_address(self) -> Path:
        """Where ``bundlegnn serve`` writes the URL it listens on."""
        return self.state_dir / "api.addr"


ENV_PREFIX = "BUNDLEGNN_"


class Settings(BaseSettings):
    """All settings of one deployment."""

    # a variable set to "null" is YAML's null, so the keys whose null means something can take it from the environment
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      env_parse_none_str="null")

    data: DataConfig = Field(default_factory=DataConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    scoring: ScorerConfig = Field(default_factory=ScorerConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed in as init kwargs).
        return env_settings, init_settings


class ConfigError(ValueError):
    """A config file or variable is wrong; the message names the key."""


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read ``path`` (YAML) if given, apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    unknown = sorted(k for k in os.environ
                     if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].split("__")[0].lower() not in Settings.model_fields)
    if unknown:
        raise ConfigError(f"unknown setting in the environment: {', '.join(unknown)} (sections: "
                          f"{', '.join(ENV_PREFIX + f.upper() for f in Settings.model_fields)})")
    try:
        return Settings(**raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ConfigError(f"invalid config {path or '(defaults)'}:\n" + "\n".join(lines)) from exc
