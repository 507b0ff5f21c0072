"""Process-wide logging: human-readable lines on a terminal, one JSON object per line in production.

JSON lines are what log shippers (Loki, CloudWatch, Elasticsearch) index
without parsing rules; every record carries time, level, logger and message,
plus the exception text and any ``extra={...}`` fields.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class LogConfig(BaseModel):
    """The ``log:`` section of a config file."""

    model_config = ConfigDict(extra="forbid")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="least severe level logged")
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per line (production)")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def dict_config(config: LogConfig) -> dict:
    """A :func:`logging.config.dictConfig` mapping; Faust's worker takes it as its ``logging_config``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}, "text": {"format": TEXT_FORMAT}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": config.format,
                                 "stream": "ext://sys.stderr"}},
        "root": {"level": config.level, "handlers": ["default"]},
        # per-connection and per-request chatter of the Kafka and HTTP clients
        "loggers": {name: {"level": "WARNING"} for name in ("kafka", "aiokafka", "httpx", "httpcore")},
    }


def setup_logging(config: LogConfig) -> None:
    """Route every logger through one stderr handler in the configured format."""
    logging.config.dictConfig(dict_config(config))
