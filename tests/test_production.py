"""The production shape: configs/production.yaml, docker/compose.yaml, the images, JSON logs."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from bundlegnn.cli import app
from bundlegnn.config import ConfigError, load_settings
from bundlegnn.logs import JsonFormatter

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ROOT / "configs" / "production.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"


def test_production_config_points_at_kafka_and_overrides_work(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(PRODUCTION)
    assert s.stream.bootstrap_servers == "kafka:9092" and s.stream.partitions == 12 and s.stream.metrics_port == 9100
    assert str(s.paths.model_store) == "/models" and s.serving.host == "0.0.0.0" and s.log.format == "json"
    monkeypatch.setenv("BUNDLEGNN_STREAM__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("BUNDLEGNN_STREAM__TOPICS__ORDERS", "shop-orders")
    monkeypatch.setenv("BUNDLEGNN_PROMOTION__MIN_GAIN", "0.02")
    s = load_settings(PRODUCTION)
    assert s.stream.bootstrap_servers == "k1:9092,k2:9092" and s.stream.topics.orders == "shop-orders"
    assert s.stream.topics.catalog == "catalog" and s.promotion.min_gain == 0.02


def test_unknown_variable_or_bad_value_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNDLEGNN_STREEM__PARTITIONS", "4")  # a typo must not be ignored
    with pytest.raises(ConfigError, match="unknown setting in the environment: BUNDLEGNN_STREEM__PARTITIONS"):
        load_settings(PRODUCTION)
    monkeypatch.delenv("BUNDLEGNN_STREEM__PARTITIONS")
    monkeypatch.setenv("BUNDLEGNN_PROMOTION__METRIC", "accuracy")
    with pytest.raises(ConfigError, match="promotion.metric: Input should be 'ndcg@10'"):
        load_settings(PRODUCTION)
    monkeypatch.setenv("BUNDLEGNN_PROMOTION__METRIC", "hr@10")
    monkeypatch.setenv("BUNDLEGNN_TRAINING__PRECISION", "fp8")
    with pytest.raises(ConfigError, match="training.precision"):
        load_settings(PRODUCTION)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _default(value: object) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def test_compose_services_run_valid_commands_with_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _compose()["services"]
    assert {"kafka", "topics", "worker", "api", "retrain", "retrain-gpu", "seed"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    cli = typer.main.get_command(app)
    ours = {name: svc for name, svc in services.items() if "bundlegnn" in str(svc.get("image", ""))}
    assert set(ours) == {"worker", "api", "retrain", "retrain-gpu", "seed"}
    for name, svc in ours.items():
        env = {k: _default(v) for k, v in svc["environment"].items()}
        for key in [k for k in env if k.startswith("BUNDLEGNN_")]:
            monkeypatch.setenv(key, env[key])
        settings = load_settings(PRODUCTION)  # every BUNDLEGNN_ variable a service sets is a valid setting
        assert settings.stream.bootstrap_servers == "kafka:9092"
        for key in [k for k in env if k.startswith("BUNDLEGNN_")]:
            monkeypatch.delenv(key)
        command = svc["command"]
        lines = [line.strip() for line in command[0].splitlines()] if svc.get("entrypoint") else [
            "bundlegnn " + " ".join(command)]
        runs = [line.split()[1:] for line in lines if line.startswith("bundlegnn ")]
        assert runs, name
        for args in runs:  # the subcommand exists and takes these options
            sub = cli.commands[args[0]]
            sub.make_context(args[0], list(args[1:]))
            config = args[args.index("--config") + 1]
            assert config.startswith("/etc/bundlegnn/") and (ROOT / "configs" / Path(config).name).exists()
        if name in ("worker", "api"):
            assert "healthcheck.py" in " ".join(svc["healthcheck"]["test"])


def test_event_topics_keep_everything_for_retraining() -> None:
    script = _compose()["services"]["topics"]["command"][0]
    created = dict(re.findall(r"^create (\S+) .* (\S+=\S+)$", script, re.M))
    assert created == {"catalog": "cleanup.policy=compact", "interactions": "retention.ms=-1",
                       "orders": "retention.ms=-1", "repartition": "retention.ms=604800000",
                       "bundle-updates": "cleanup.policy=compact",
                       "dead-letters": "retention.ms=2592000000", "model-updates": "retention.ms=-1"}
    topics = load_settings(PRODUCTION).stream.topics
    assert set(created) == set(topics.model_dump().values())
    # the topics the commands create where no such service runs (Kubernetes, managed Kafka) are the same
    assert {name: "".join(f"{k}={v}" for k, v in kv.items()) for name, kv in topics.configs().items()} == created


def test_commands_create_topics_with_their_configs_and_warn_where_existing_ones_would_lose_history(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A broker's defaults keep records 7 days and compact nothing: created without configs, the order topics
    would lose the retraining's history and the catalog its old items. (tansu, the embedded broker, keeps
    and reports no topic configs, so this runs against a stand-in for the admin client.)"""
    from streaming import broker

    made: list = []

    class Admin:
        def __init__(self, **options: object) -> None:
            pass

        def list_topics(self) -> list[str]:
            return ["orders", "catalog"]

        def create_topics(self, topics: list) -> None:
            made.extend(topics)

        def describe_configs(self, resources: list, config_filter: str) -> dict:
            assert config_filter == "all" and [r.name for r in resources] == ["catalog", "orders"]
            return {"topic": {"orders": {"retention.ms": {"value": "604800000"}},
                              "catalog": {"cleanup.policy": {"value": "compact"}}}}

        def close(self) -> None:
            pass

    monkeypatch.setattr(broker, "KafkaAdminClient", Admin)
    monkeypatch.setenv("BUNDLEGNN_STREAM__REPLICATION_FACTOR", "3")
    stream = load_settings(PRODUCTION).stream
    with caplog.at_level(logging.WARNING, logger="streaming.broker"):
        broker.create_topics("k:9092", stream.topics.layout(stream.partitions), stream.replication_factor,
                             stream.security, stream.topics.configs())
    assert {t.name: (t.num_partitions, t.replication_factor, t.topic_configs) for t in made} == {
        "interactions": (12, 3, {"retention.ms": "-1"}), "repartition": (12, 3, {"retention.ms": "604800000"}),
        "bundle-updates": (12, 3, {"cleanup.policy": "compact"}), "dead-letters": (1, 3, {"retention.ms": "2592000000"}),
        "model-updates": (1, 3, {"retention.ms": "-1"})}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("topic orders has retention.ms=604800000, the system needs -1")


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker compose client on this machine")
def test_compose_file_validates_with_the_docker_client() -> None:
    cli = _compose_cli()
    assert cli is not None
    for profile in ([], ["--profile", "gpu"], ["--profile", "seed"]):
        run = subprocess.run([*cli, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True,
                             cwd=ROOT)
        assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_are_multi_stage_non_root_with_a_healthcheck(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2 and "COPY --from=build" in text
    assert re.search(r"^USER bundlegnn$", text, re.M) and "HEALTHCHECK" in text
    assert "torch==" in text and "--index-url https://download.pytorch.org/whl/" in text  # torch before the rest
    packages = yaml.safe_load("[" + re.search(r'include = \[(.*)\]', (ROOT / "pyproject.toml").read_text())[1] + "]")
    for package in packages:
        assert f"COPY {package.rstrip('*')} " in text, package


def test_healthcheck_script_reports_down_as_unhealthy() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), "http://127.0.0.1:9/healthz"],
                         capture_output=True, text=True, timeout=10)
    assert run.returncode == 1 and "unhealthy" in run.stderr


def test_json_logs_carry_fields_and_exceptions() -> None:
    record = logging.LogRecord("bundlegnn.train", logging.ERROR, __file__, 1, "promotion: %s", ("refused",),
                               None)
    record.version = "v2"
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "ERROR" and out["logger"] == "bundlegnn.train" and out["msg"] == "promotion: refused"
    assert out["version"] == "v2" and "ValueError: boom" in out["exc"] and out["ts"].endswith("+00:00")
