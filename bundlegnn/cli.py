"""The ``bundlegnn`` command."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from bundlegnn.config import ConfigError, Settings, load_settings
from bundlegnn.logs import dict_config, setup_logging
from bundlegnn.provenance import describe, machine
from graph.store import tune_gc

if TYPE_CHECKING:
    import socket
    from typing import Iterator, TextIO

    from training.datasets import DataConfig, ImportReport, Sourced
    from training.protocol import Events


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Real-time 'frequently bought together' engine.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (env BUNDLEGNN_* overrides it)")


def _settings(config: Optional[Path]) -> Settings:
    """Load and validate the settings (exit 2 naming the bad key) and set up logging from them."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    setup_logging(settings.log)
    return settings


JSON_LINES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def _data(settings: Settings, data: Optional[Path]) -> "DataConfig":
    """The configured dataset, ``--data`` replacing its path (a file named as JSON lines is read as such, not
    through the config's CSV mapping); exits 2 when it is missing."""
    cfg = settings.data if data is None else settings.data.model_copy(update={"path": data})
    if data is not None and data.name.lower().endswith(JSON_LINES):
        cfg = cfg.model_copy(update={"format": "jsonl"})
    for path in (cfg.path, cfg.catalog_path):
        if path is not None and not path.exists():
            typer.echo(f"dataset not found: {path}", err=True)
            raise typer.Exit(2)
    return cfg


def _source(cfg: "DataConfig", report: "ImportReport", progress: bool = True,
            in_process: bool = False) -> "Iterator[Sourced]":
    """The dataset as ``(line, event or bad row)`` (``in_process``: read by a second process, orders as their
    facts); a wrong mapping exits 2 with the reason."""
    from training.datasets import read_source, read_source_in_process

    try:
        return read_source_in_process(cfg, report, progress) if in_process else read_source(cfg, report, progress)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc


def _read(settings: Settings, data: Optional[Path]) -> tuple["Events", dict]:
    """The dataset's events in time order, for training, and the reader's report. The file is parsed once,
    into an :class:`~training.datasets.EventSpool` under the state dir that every later pass reads back; a
    file out of time order (e.g. two exports appended) is sorted on disk into a second spool."""
    from training.datasets import BadRow, EventSpool, ImportReport

    cfg = _data(settings, data)
    report = ImportReport()
    last, ordered = float("-inf"), True
    spool = EventSpool(settings.paths.state_dir / "tmp")
    for _, event in _source(cfg, report):
        if not isinstance(event, BadRow):
            ordered, last = ordered and event.epoch >= last, max(last, event.epoch)
            spool.add(event)
    spool.seal()
    if ordered:
        return spool, report.summary()
    logging.getLogger("bundlegnn").info("%s is not in time order: sorting its events", cfg.path)
    return spool.in_time_order(), report.summary()


DataOpt = typer.Option(None, "--data", help="dataset file (default: data.path from the config); *.jsonl(.gz) "
                       "and *.ndjson(.gz) are read as JSON lines of events")
DeadOpt = typer.Option(None, "--dead-letters", help="where rows and events that cannot be used are written, one "
                       "JSON object per line with the line number and reason (default: <state_dir>/"
                       "import-dead-letters.jsonl)")


@app.command("build-graph")
def build_graph(
    config: Optional[Path] = ConfigOpt,
    data: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, help="snapshot directory (default: <state_dir>/graph)"),
    dead_letters: Optional[Path] = DeadOpt,
) -> None:
    """Import a dataset through the graph store (streaming) and save a snapshot."""
    from graph.snapshot import save
    from graph.store import GraphStore
    from training.datasets import ImportReport, import_into

    settings = _settings(config)
    cfg = _data(settings, data)
    out = out or settings.paths.snapshot
    dead_path = dead_letters or settings.paths.import_dead_letters
    dead_path.parent.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    store = GraphStore(settings.graph)
    started = time.perf_counter()
    with open(dead_path, "w") as dead:
        done = import_into(store, _source(cfg, report, in_process=True), dead, cfg.path)
    elapsed = time.perf_counter() - started
    saving = time.perf_counter()
    snapshot_id = save(store, out)
    summary = {
        "dataset": report.summary(),
        "graph": {
            "items": store.num_items,
            "users": store.num_users,
            "co_purchase_edges": store.num_co_edges(),
            "user_item_edges": store.num_ui_edges(),
            "orders_in_window": len(store.orders),
            "co_purchase_bytes": store.co.nbytes,
            "store_array_bytes": store.nbytes,
            **store.stats.as_dict(),
        },
        "dead_letters": {"file": str(dead_path), "bad_rows": done.bad_rows, "refused_events": done.refused},
        "import_seconds": round(elapsed, 2),
        "save_seconds": round(time.perf_counter() - saving, 2),
        "snapshot": str(out),
        "snapshot_id": snapshot_id,
    }
    typer.echo(json.dumps(summary, indent=2))
    if store.stats.outside_window:
        typer.echo(f"{store.stats.outside_window} orders or cancellations were dated before the order window "
                   f"(graph.order_window_days={settings.graph.order_window_days}) of the newest order when they were "
                   f"read: the file is not sorted by time. They are in {dead_path}; sort the file by time or widen "
                   "the window to import them.", err=True)


@app.command()
def train(
    config: Optional[Path] = ConfigOpt,
    data: Optional[Path] = DataOpt,
    from_topics: bool = typer.Option(False, "--from-topics", help="read the graph from the event topics "
                                     "(from the beginning) instead of a dataset file"),
    promote: bool = typer.Option(False, help="compare with the live model on the latest orders and write the "
                                 "artifact only if the new model is better (exit 3 when it is not)"),
    publish: Optional[bool] = typer.Option(None, help="announce the new artifact on model-updates so running "
                                           "workers load it (default: with --promote)"),
) -> None:
    """Train the GNN on the whole graph and write a versioned model artifact.

    Exit codes: 0 written (and published), 1 failed, 2 bad config or input,
    3 not promoted because the candidate is not better than the live model.
    """
    from graph.events import Order, OrderFacts
    from graph.snapshot import save as save_snapshot
    from serving.bundle_fit import fit_candidate
    from training import job
    from training.artifact import latest_artifact, load_artifact, prune_artifacts
    from training.promote import judge

    settings = _settings(config)
    log = logging.getLogger("bundlegnn.train")
    publish = promote if publish is None else publish
    bootstrap = _bootstrap(settings) if publish or from_topics else ""
    started = time.perf_counter()
    if from_topics:
        from streaming.topics import read_events

        events, rejected = read_events(bootstrap, settings.stream.topics, settings.paths.state_dir / "tmp",
                                       security=settings.stream.security)
        source: dict = {"topics": bootstrap, "events": events.events, "rejected": rejected}
    else:
        events, report = _read(settings, data)
        source = {"dataset": report}
    if not any(isinstance(e, (Order, OrderFacts)) for e in (events() if callable(events) else events)):
        typer.echo("no orders to train on", err=True)
        raise typer.Exit(2)
    encoder = settings.encoder.build(settings.paths.text_cache)
    gate = settings.promotion
    cand = job.fit(events, settings.training, settings.graph, encoder, gate.val_frac, gate.window_frac if promote else 0.0)
    pair_model = fit_candidate(cand, events, settings.training, settings.graph, encoder, settings.scoring)
    store = job.full_store(cand, events, settings.graph)
    snapshot_id = save_snapshot(store, settings.paths.snapshot)
    extra: dict = {"source": source, "pair_model": pair_model.model_dump() if pair_model is not None else None}
    if promote:
        live_path = latest_artifact(settings.paths.model_store)
        live = load_artifact(live_path) if live_path else None
        decision = judge(cand, live, encoder, settings.training, settings.training.device, gate)
        extra["promotion"] = {**decision.as_dict(), "window_from": cand.split.protocol["test_from"],
                              "window_queries": len(cand.split.test)}
        log.info("promotion: %s", decision.reason)
        if not decision.promoted:
            typer.echo(json.dumps({"promoted": False, **extra, "pair_model": _pair_digest(extra["pair_model"])},
                                  indent=2))
            raise typer.Exit(3)
    path, summary = job.save(cand, store, settings.training, encoder, settings.paths.model_store, snapshot_id, extra)
    pruned = prune_artifacts(settings.paths.model_store, settings.paths.keep_models)
    if pruned:
        log.info("removed %d older model versions (paths.keep_models=%d): %s", len(pruned),
                 settings.paths.keep_models, ", ".join(p.name for p in pruned))
    if publish:
        from kafka.errors import KafkaError

        from streaming.producer import publish_model

        try:
            publish_model(bootstrap, settings.stream.topics.model_updates, str(path.resolve()), path.name,
                          security=settings.stream.security)
        except KafkaError as exc:
            log.error("model %s written but not announced on %s (%r): workers load it when they restart",
                      path.name, settings.stream.topics.model_updates, exc)
            raise typer.Exit(1) from exc
        log.info("published %s on %s", path.name, settings.stream.topics.model_updates)
    summary = {"artifact": str(path), "promoted": True if promote else None, "published": publish,
               "removed_versions": [p.name for p in pruned], **summary,
               "pair_model": _pair_digest(summary.get("pair_model")),
               "total_seconds": round(time.perf_counter() - started, 1)}
    typer.echo(json.dumps({k: v for k, v in summary.items() if k not in ("graph", "training")}, indent=2))


def _pair_digest(pair: dict | None) -> dict | None:
    """The pair model as ``train`` prints it: its size and five largest standardised weights (its 3 × 42
    parameters were 190 of the summary's 270 lines; the artifact's manifest keeps them all)."""
    if not pair:
        return pair
    largest = sorted(zip(pair["terms"], pair["weights"]), key=lambda tw: -abs(tw[1]))[:5]
    return {"terms": len(pair["terms"]), "pairs": pair["pairs"], "positives": pair["positives"],
            "intercept": round(pair["intercept"], 4), "largest_weights": {t: round(w, 4) for t, w in largest}}


@app.command()
def evaluate(
    config: Optional[Path] = ConfigOpt,
    data: Optional[Path] = DataOpt,
    seeds: str = typer.Option("0", help="comma-separated seeds; mean ± std over them"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the report here"),
    png: Optional[Path] = typer.Option(None, help="bar chart of the test metrics (default: next to --json)"),
    held_out: float = typer.Option(0.1, min=0.0, max=0.5,
                                   help="share of items left out of training for the leave-items-out slice (0: skip)"),
    task: str = typer.Option("item", help="item: basket completion on the configured dataset; bundle: the API's "
                             "bundles against real bundles (--data: the amazon_intent_bundles folder)"),
    domains: str = typer.Option(",".join(("electronic", "clothing", "food")),
                                help="--task bundle: comma-separated domain folders under --data"),
    merge: Optional[str] = typer.Option(None, help="comma-separated reports (--json files) of the same command "
                                        "and commit on other seeds: one report of all their runs, nothing rerun"),
) -> None:
    """Compare the GNN with popularity, co-occurrence, EASE^R and text baselines (--task bundle: the bundle
    builder with the anchors' top complements, co-occurrence, text and popularity, on real bundles)."""
    if merge:
        _merge_reports([Path(p) for p in merge.split(",")], json_path, png)
        return
    settings = _settings(config)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError as exc:
        typer.echo(f"--seeds must be comma-separated integers, got {seeds!r}", err=True)
        raise typer.Exit(2) from exc
    if task == "bundle":
        _evaluate_bundles(settings, data, domains.split(","), seed_list, json_path)
        return
    if task != "item":
        typer.echo(f"--task must be item or bundle, got {task!r}", err=True)
        raise typer.Exit(2)
    from training.evaluation import evaluate as run, summarise

    events, _ = _read(settings, data)
    encoder = settings.encoder.build(settings.paths.text_cache)
    started = time.perf_counter()
    summary = summarise([run(events, settings.graph, settings.training, encoder, seed=s, held_out=held_out)
                         for s in seed_list])
    command = ("".join(f"{o} " for o in _environment_overrides()) + "bundlegnn evaluate"
               + (f" --config {config}" if config else "") + (f" --data {data}" if data else "")
               + (f" --held-out {held_out:g}" if held_out != 0.1 else "") + f" --seeds {seeds}")
    summary["provenance"] = {**machine(), "command": command, "wall_s": round(time.perf_counter() - started)}
    _item_report(summary, json_path, png)


def _item_report(summary: dict, json_path: Optional[Path], png: Optional[Path]) -> None:
    """An item evaluation's tables on stdout, and its JSON, markdown and chart when asked for."""
    from training.evaluation import markdown, plot

    tables = f"{describe(summary['provenance'])}. `{summary['provenance']['command']}`.\n\n" + markdown(summary)
    if json_path:
        _write_report(json_path, summary, tables)
        plot(summary, png or json_path.with_suffix(".png"))
    elif png:
        plot(summary, png)
    typer.echo(tables)


def _merge_reports(paths: list[Path], json_path: Optional[Path], png: Optional[Path]) -> None:
    """``evaluate --merge``: several item reports as one (see :func:`training.evaluation.merge`)."""
    from training.evaluation import merge

    try:
        summary = merge([json.loads(p.read_text()) for p in paths])
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"cannot merge {', '.join(map(str, paths))}: {exc!r}", err=True)
        raise typer.Exit(2) from exc
    _item_report(summary, json_path, png)


def _evaluate_bundles(settings: Settings, data: Optional[Path], domains: list[str], seeds: list[int],
                      json_path: Optional[Path]) -> None:
    """``evaluate --task bundle``: every domain on every seed (see :mod:`serving.bundle_eval`)."""
    from serving.bundle_eval import evaluate_domain, markdown, summarise
    from training.intent_bundles import IntentBundles

    root = data or Path("../shared/data/amazon_intent_bundles")
    try:
        sets = [IntentBundles.read(root / d) for d in domains]
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    encoder = settings.encoder.build(settings.paths.text_cache)
    summaries = [summarise([evaluate_domain(d, settings.graph, settings.training, settings.scoring,
                                            settings.serving.rules, encoder, seed=s) for s in seeds]) for d in sets]
    ran = machine()
    overrides = _environment_overrides()
    tables = (f"# Bundles against real bundles\n\n{describe(ran)}. `bundlegnn evaluate --task bundle --seeds "
              f"{','.join(map(str, seeds))}`, configs/default.yaml"
              + (f", with {', '.join(overrides)}" if overrides else "") + ".\n\n" + markdown(summaries))
    if json_path:
        _write_report(json_path, {"machine": ran, "settings_from_environment": overrides, "domains": summaries}, tables)
    typer.echo(tables)


def _environment_overrides() -> list[str]:
    """``NAME=value`` of every setting the environment changed for this run (paths and secrets left out): a
    report names them beside its command."""
    return sorted(f"{k}={v}" for k, v in os.environ.items()
                  if k.startswith("BUNDLEGNN_") and not k.startswith("BUNDLEGNN_PATHS__")
                  and not any(w in k for w in ("KEY", "SECRET", "PASSWORD", "TOKEN")))


def _write_report(json_path: Path, report: dict, tables: str) -> None:
    """An evaluation's JSON at ``json_path`` and its markdown beside it (``.md``)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    json_path.with_suffix(".md").write_text(tables)


def _bootstrap(settings: Settings) -> str:
    """Kafka's address: the configured servers, or the running embedded broker's; ``stream.security``'s files
    are read here, so a wrong one stops the command at start with its name."""
    servers, security = settings.stream.bootstrap_servers, settings.stream.security
    try:
        security.ssl_context()
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    if servers != "embedded":
        return servers
    if security.protocol != "PLAINTEXT":
        typer.echo(f"stream.security.protocol is {security.protocol} but the embedded broker serves PLAINTEXT: "
                   "set stream.bootstrap_servers to your Kafka", err=True)
        raise typer.Exit(2)
    addr = settings.paths.broker_address
    if not addr.exists():
        typer.echo(f"stream.bootstrap_servers is 'embedded' but no broker runs ({addr} missing): "
                   "start one with `bundlegnn broker`", err=True)
        raise typer.Exit(2)
    return addr.read_text().strip()


def _create_topics(settings: Settings, bootstrap: str) -> None:
    from streaming.broker import create_topics

    stream = settings.stream
    create_topics(bootstrap, stream.topics.layout(stream.partitions), stream.replication_factor, stream.security,
                  stream.topics.configs())


def _check_partitions(settings: Settings, bootstrap: str) -> None:
    """A worker's task ``p`` is partition ``p`` of every input topic and the share of the graph whose items
    Kafka's partitioner puts there, so every input topic needs ``stream.partitions`` partitions: refuse to start
    otherwise (topics made earlier under another count would send repartition records nowhere)."""
    from streaming.broker import topic_partitions

    wanted, inputs = settings.stream.partitions, list(settings.stream.topics.inputs())
    found = topic_partitions(bootstrap, inputs, settings.stream.security)
    wrong = {name: n for name, n in found.items() if n != wanted}
    if wrong:
        counts = sorted(set(found.values()))
        fix = (f"set stream.partitions to {counts[0]}" if len(counts) == 1 else "recreate them with one count")
        typer.echo(f"stream.partitions is {wanted} but topics have other partition counts: {wrong}; every input "
                   f"topic ({', '.join(inputs)}) needs the same count, which stream.partitions names: {fix}", err=True)
        raise typer.Exit(2)


@app.command()
def replay(
    config: Optional[Path] = ConfigOpt,
    data: Optional[Path] = DataOpt,
    rate: float = typer.Option(0.0, min=0, help="events per second; 0 sends as fast as possible"),
    dead_letters: Optional[Path] = DeadOpt,
) -> None:
    """Send a dataset to Kafka as events, read as a stream (catalog keyed by item, orders by order id)."""
    from streaming.producer import EventProducer, replay as send_all
    from training.datasets import BadRow, ImportReport

    settings = _settings(config)
    bootstrap = _bootstrap(settings)
    cfg = _data(settings, data)
    dead_path = dead_letters or settings.paths.import_dead_letters
    dead_path.parent.mkdir(parents=True, exist_ok=True)
    _create_topics(settings, bootstrap)
    report = ImportReport()
    source = _source(cfg, report)
    started = time.perf_counter()

    def events(dead: "TextIO") -> "Iterator":
        for _, event in source:
            if isinstance(event, BadRow):
                dead.write(event.as_json(cfg.path) + "\n")
            else:
                yield event

    producer = EventProducer(bootstrap, settings.stream.topics, settings.stream.security)
    with open(dead_path, "w") as dead, producer:
        sent = send_all(events(dead), producer, rate, progress=False)
    typer.echo(json.dumps({"sent": sent, "seconds": round(time.perf_counter() - started, 2),
                           "dataset": report.summary(), "dead_letters": str(dead_path)}))


@app.command()
def redrive(
    config: Optional[Path] = ConfigOpt,
    reason: Optional[str] = typer.Option(None, help="send only the letters whose reason holds this text"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count what would be sent; send and commit nothing"),
) -> None:
    """Send the dead letters that now parse back to their event topic, once each: after an upgrade or a
    setting that accepts what was refused (the worker judges them again)."""
    from streaming.redrive import redrive as send_again

    settings = _settings(config)
    bootstrap = _bootstrap(settings)
    stream = settings.stream
    done = send_again(bootstrap, stream.topics, f"{stream.app_id}-redrive", stream.security, reason, dry_run)
    typer.echo(json.dumps({**done.summary(), "dry_run": dry_run}))


ModelOpt = typer.Option("latest", "--model", help="artifact directory, 'latest' (newest in the model store) or 'none'")


@app.command()
def worker(
    config: Optional[Path] = ConfigOpt,
    model: str = ModelOpt,
    snapshot: Optional[Path] = typer.Option(None, help="write the worker's graph (its tasks' share) here when it stops"),
) -> None:
    """Run the Faust stream worker and its scoring process (Ctrl-C stops both)."""
    from faust import Worker

    from streaming.scorer import ScorerLink, ScorerSpec
    from streaming.worker import build_app
    from training.artifact import latest_artifact

    settings = _settings(config)
    bootstrap = _bootstrap(settings)
    _create_topics(settings, bootstrap)
    _check_partitions(settings, bootstrap)
    path = latest_artifact(settings.paths.model_store) if model == "latest" else None if model == "none" else Path(model)
    spec = ScorerSpec(settings.stream, settings.graph, settings.scoring, bootstrap,
                      settings.encoder if settings.stream.encode_text else None, settings.paths.text_cache,
                      settings.training.device, path, snapshot, dict_config(settings.log),
                      settings.paths.model_store, settings.paths.checkpoints)
    try:
        scorer = ScorerLink.start(spec)
    except RuntimeError as exc:
        logging.getLogger("bundlegnn").error("%s", exc)
        raise typer.Exit(1) from exc
    faust_app = build_app(settings.stream, scorer, bootstrap, settings.paths.state_dir / "faust",
                          settings.paths.checkpoints)
    Worker(faust_app, loglevel=settings.log.level, logging_config=dict_config(settings.log)).execute_from_commandline()


@app.command()
def broker(
    config: Optional[Path] = ConfigOpt,
    port: int = typer.Option(0, min=0, max=65535, help="0 picks a free port"),
) -> None:
    """Run the embedded Kafka-protocol broker (tansu, memory storage) until Ctrl-C."""
    from streaming.broker import BrokerError, EmbeddedBroker, create_topics

    settings = _settings(config)
    addr = settings.paths.broker_address
    addr.parent.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedBroker(port, log_path=settings.paths.state_dir / "broker.log")
    try:
        embedded.start()
    except BrokerError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM (docker stop, systemd, kill) stops tansu too, as Ctrl-C does

    signal.signal(signal.SIGTERM, terminated)
    try:
        create_topics(embedded.bootstrap, settings.stream.topics.layout(settings.stream.partitions))
        addr.write_text(embedded.bootstrap)
        typer.echo(f"embedded broker on {embedded.bootstrap} (address in {addr}); Ctrl-C stops it", err=True)
        embedded.process.wait()
        typer.echo(f"broker exited with code {embedded.process.returncode}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("stopping the broker", err=True)
    finally:
        addr.unlink(missing_ok=True)
        embedded.stop()


def _listen(host: str, port: int) -> "socket.socket":
    """A socket already listening on ``host:port`` (port 0: a free one).

    It listens before the address is announced, so a client that connects
    while uvicorn is still starting waits in the backlog instead of being
    refused (the end-to-end test was refused on a loaded machine).
    """
    from bundlegnn.net import bound_socket

    try:
        sock = bound_socket(host, port)
    except OSError as exc:
        typer.echo(f"cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(2) from exc
    sock.listen(2048)  # uvicorn's default backlog
    return sock


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    model: str = ModelOpt,
    host: Optional[str] = typer.Option(None, help="default: serving.host"),
    port: Optional[int] = typer.Option(None, min=0, max=65535, help="default: serving.port; 0 picks a free one"),
) -> None:
    """Run the HTTP bundle API over a view of the bundle-updates and catalog topics (Ctrl-C stops it)."""
    import uvicorn

    from serving.api import create_app
    from serving.feed import FeedTopics, ViewFeed
    from serving.view import BundleView
    from training.artifact import latest_artifact, load_artifact

    settings = _settings(config)
    cfg = settings.serving
    bootstrap = _bootstrap(settings)
    _create_topics(settings, bootstrap)
    view = BundleView(max_users=cfg.max_users)
    path = latest_artifact(settings.paths.model_store) if model == "latest" else None if model == "none" else Path(model)
    info, pair_model = None, None
    if path is not None:
        from serving.api import ModelInfo
        from serving.bundle_fit import PairModel

        art = load_artifact(path)
        if cfg.rules.fitted and art.manifest.get("pair_model"):
            try:
                pair_model = PairModel.model_validate(art.manifest["pair_model"])
            except ValueError as exc:
                logging.getLogger("bundlegnn.serve").warning(
                    "model %s: its pair model is unusable (%s); bundles are ranked by relevance", art.version, exc)
        seeded = view.seed_from_model(art.version, art.item_ids, art.src, art.dst, art.prior, art.model.temperature,
                                      cfg.seed_top_k, art.decoder_rows)
        info = ModelInfo.of(art.version, art.manifest, pair_model is not None)
        typer.echo(f"model {art.version}: seeded {seeded} complement lists"
                   + (" (the GNN's embeddings have weight 0 in its decoder)" if info.decoder and not info.gnn_weight
                      else ""), err=True)
    t = settings.stream.topics
    def settle() -> None:  # the view's start-up bulk will live long: keep it out of GC scans (tail latency)
        view.titles.catch_up()  # and the first search does not join every title
        gc.collect()
        gc.freeze()

    feed = ViewFeed(view, bootstrap, FeedTopics(t.catalog, t.bundle_updates, t.orders, t.interactions),
                    on_ready=settle, fetch_max_wait=settings.stream.fetch_max_wait, stale_after=cfg.stale_after,
                    signing_key=settings.stream.signing_secret(),
                    kafka_options=settings.stream.security.client_options())

    def health() -> tuple[bool, str | None]:
        if feed.error is not None:
            return False, f"view feed stopped: {feed.error!r}"
        return feed.ready.is_set(), "view feed stopped" if not feed.alive else feed.stale()

    api = create_app(view, cfg.rules, health, cfg.cache_size, info, cfg.cache_bytes, cfg.body_limit,
                     view_behind=lambda: feed.behind, pair_model=pair_model, cors_origins=cfg.cors_origins)
    sys.setswitchinterval(cfg.switch_interval)  # the event loop shares the interpreter with the feed thread
    age = api.state.metrics.update_age
    feed.on_update = lambda update, now: age.observe(now - update.source_ts) if update.source_ts else None
    feed.start()
    sock = _listen(host or cfg.host, cfg.port if port is None else port)
    bound_host, bound_port = sock.getsockname()[:2]
    address = f"http://{bound_host}:{bound_port}"
    settings.paths.api_address.parent.mkdir(parents=True, exist_ok=True)
    settings.paths.api_address.write_text(address)
    typer.echo(f"bundle API on {address} (docs: {address}/docs); Ctrl-C stops it", err=True)
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False, loop="uvloop", http="httptools"))
    try:
        server.run(sockets=[sock])
    finally:
        feed.stop()
        settings.paths.api_address.unlink(missing_ok=True)


@app.command()
def demo(
    config: Optional[Path] = ConfigOpt,
    retrain: bool = typer.Option(False, help="train a new model even when one exists"),
    hold: Optional[bool] = typer.Option(None, help="keep running until Ctrl-C (default: when run from a terminal)"),
) -> None:
    """Broker, training, worker and API on real data: prints bundles and shows one change live."""
    from bundlegnn.demo import run_demo

    try:
        run_demo(_settings(config), config, retrain, hold)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from exc


def main() -> None:
    tune_gc()
    app()


if __name__ == "__main__":
    main()
