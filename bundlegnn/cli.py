"""The ``bundlegnn`` command."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from tqdm import tqdm

from bundlegnn.config import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-time 'frequently bought together' engine.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (env BUNDLEGNN_* overrides it)")


def _settings(config: Optional[Path]) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _missing(capability: str, issue: str) -> None:
    typer.echo(f"not available yet: {capability} ({issue}).", err=True)
    raise typer.Exit(3)


@app.command("build-graph")
def build_graph(
    config: Optional[Path] = ConfigOpt,
    data: Optional[Path] = typer.Option(None, help="dataset file (default: data.path from the config)"),
    out: Optional[Path] = typer.Option(None, help="snapshot path (default: <state_dir>/graph.npz)"),
) -> None:
    """Replay a dataset through the graph store and save a snapshot."""
    from graph.snapshot import save
    from graph.store import GraphStore
    from training.datasets import ReplayReport, online_retail_events

    settings = _settings(config)
    data = data or settings.data.path
    out = out or settings.paths.snapshot
    if not data.exists():
        typer.echo(f"dataset not found: {data}", err=True)
        raise typer.Exit(2)
    store, report = GraphStore(settings.graph), ReplayReport()
    started = time.perf_counter()
    for event in tqdm(online_retail_events(data, report), desc="replay", unit=" events", disable=None):
        store.apply(event)
    elapsed = time.perf_counter() - started
    snapshot_id = save(store, out)
    summary = {
        "dataset": report.summary(),
        "graph": {
            "items": store.num_items,
            "users": store.num_users,
            "co_purchase_edges": store.num_co_edges(),
            "user_item_edges": store.num_ui_edges(),
            **store.stats.as_dict(),
        },
        "replay_seconds": round(elapsed, 2),
        "snapshot": str(out),
        "snapshot_id": snapshot_id,
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def train(config: Optional[Path] = ConfigOpt) -> None:
    """Train the GNN on the whole graph and write a versioned model artifact."""
    _missing("text encoder + GNN training", "issue: Training")


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt) -> None:
    """Compare the GNN with popularity, co-occurrence, EASE^R and text baselines."""
    _missing("evaluation protocol and baselines", "issue: Training")


@app.command()
def replay(config: Optional[Path] = ConfigOpt) -> None:
    """Send a dataset to Kafka as events."""
    _missing("Kafka producer / replay", "issue: Streaming")


@app.command()
def worker(config: Optional[Path] = ConfigOpt) -> None:
    """Run the Faust stream worker."""
    _missing("Faust stream worker", "issue: Streaming")


@app.command()
def broker(config: Optional[Path] = ConfigOpt) -> None:
    """Run the embedded Kafka-protocol broker (tansu) in the foreground."""
    _missing("embedded broker launcher", "issue: Streaming")


@app.command()
def serve(config: Optional[Path] = ConfigOpt) -> None:
    """Run the HTTP bundle API."""
    _missing("HTTP bundle API", "issue: Serving")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
