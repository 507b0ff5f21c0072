"""Settings (file + environment) and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bundlegnn.cli import app
from bundlegnn.config import ConfigError, load_settings
from tests.conftest import RETAIL_II

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        settings = load_settings(path)
        assert settings.graph.half_life_days > 0, path


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUNDLEGNN_GRAPH__HALF_LIFE_DAYS", "7.5")
    settings = load_settings(ROOT / "configs" / "default.yaml")
    assert settings.graph.half_life_days == 7.5
    assert settings.graph.interaction_weights["cart"] == 3.0  # rest of the file still applies


def test_a_variable_set_to_null_sets_a_key_whose_null_means_something(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployments configure through the environment: "no GNN time budget", "no category cap" and "keep every
    order" are nulls, so "null" in a variable is YAML's null (it was refused as "not a number")."""
    monkeypatch.setenv("BUNDLEGNN_TRAINING__GNN_BUDGET_S", "null")
    monkeypatch.setenv("BUNDLEGNN_SERVING__RULES__MAX_PER_CATEGORY", "null")
    monkeypatch.setenv("BUNDLEGNN_GRAPH__ORDER_WINDOW_DAYS", "null")
    monkeypatch.setenv("BUNDLEGNN_TRAINING__FANOUTS", "[5, 3]")
    settings = load_settings(ROOT / "configs" / "default.yaml")
    assert settings.training.gnn_budget_s is None and settings.serving.rules.max_per_category is None
    assert settings.graph.order_window_days is None and settings.training.fanouts == [5, 3]
    monkeypatch.setenv("BUNDLEGNN_GRAPH__HALF_LIFE_DAYS", "null")  # a key that needs a value says so
    with pytest.raises(ConfigError, match="graph.half_life_days: Input should be a valid number"):
        load_settings(ROOT / "configs" / "default.yaml")


def test_wrong_key_or_value_fails_with_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("graph:\n  half_lfe_days: 3\n")
    with pytest.raises(ConfigError, match="graph.half_lfe_days: Extra inputs are not permitted"):
        load_settings(bad)
    bad.write_text("graph:\n  half_life_days: -1\n")
    with pytest.raises(ConfigError, match="graph.half_life_days: Input should be greater than 0"):
        load_settings(bad)
    monkeypatch.setenv("BUNDLEGNN_GRAPH__HALF_LIFE_DAYS", "soon")
    with pytest.raises(ConfigError, match="graph.half_life_days"):
        load_settings(None)


def test_help_lists_the_subcommands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("build-graph", "train", "evaluate", "replay", "worker", "broker", "serve"):
        assert name in result.output


def test_build_graph_writes_a_snapshot(tmp_path: Path) -> None:
    out = tmp_path / "g"
    result = CliRunner().invoke(app, ["build-graph", "--config", "configs/default.yaml", "--data", str(RETAIL_II),
                                      "--out", str(out), "--dead-letters", str(tmp_path / "dead.jsonl")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["graph"]["items"] == 2918 and summary["dataset"]["order_events"] == 1384
    assert summary["graph"]["outside_window"] == 0 and summary["dead_letters"]["refused_events"] == 245
    assert (out / "CURRENT").exists() and len(summary["snapshot_id"]) == 16
    assert len((tmp_path / "dead.jsonl").read_text().splitlines()) == 245  # the unmatched cancellations


def test_a_json_lines_file_given_with_data_is_read_as_events_whatever_the_config_says(tmp_path: Path) -> None:
    """`build-graph --data shop.jsonl.gz` under the default config (format csv, the Online Retail II mapping)
    read the events through the CSV mapping and failed; a file named as JSON lines is read as events."""
    import gzip

    from streaming.codec import encode
    from tests.conftest import retail_events

    path = tmp_path / "shop.jsonl.gz"
    events = retail_events()
    path.write_bytes(gzip.compress(b"".join(encode(e) + b"\n" for e in events)))
    result = CliRunner().invoke(app, ["build-graph", "--config", "configs/default.yaml", "--data", str(path),
                                      "--out", str(tmp_path / "g"), "--dead-letters", str(tmp_path / "dead.jsonl")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dataset"]["rows"] == len(events) and summary["graph"]["items"] == 2918


def test_build_graph_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["build-graph", "--data", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2 and "dataset not found" in result.output


def test_the_api_socket_accepts_before_the_server_runs() -> None:
    """`serve` announces its address once bound; a client connecting before uvicorn has started must
    wait in the backlog, not be refused (the end-to-end test was refused on a loaded machine)."""
    import socket

    from bundlegnn.cli import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=2):
            pass  # refused (ConnectionRefusedError) if the socket were only bound
    finally:
        sock.close()


def test_the_demo_moves_off_a_port_in_use_and_shows_why_a_child_failed(tmp_path: Path) -> None:
    """`make demo` beside another program on port 8000 (a dev server, a second demo): the API took it and
    exited, and the demo stopped with "api exited with 2; see …/api.log". Now the demo sees the port taken
    and asks for a free one; a child that fails anyway shows the end of its log."""
    import socket

    from bundlegnn.cli import _listen
    from bundlegnn.demo import Child, _port_taken

    sock = _listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        assert _port_taken("127.0.0.1", port)
        env = {**os.environ, "BUNDLEGNN_PATHS__STATE_DIR": str(tmp_path)}  # (no broker there: serve says so)
        child = Child("api", ["serve", "--port", str(port)], tmp_path / "api.log", env)
        with pytest.raises(RuntimeError, match=r"(?s)api exited with 2; the end of .*api.log:\n.*"
                                               r"'embedded' but no broker runs"):
            child.wait_for("bundle API on", 60)
    finally:
        sock.close()
    assert not _port_taken("127.0.0.1", port)
    with socket.socket() as s:  # bound but not listening still takes the port
        s.bind(("127.0.0.1", 0))
        assert _port_taken("127.0.0.1", s.getsockname()[1])


def test_sigterm_stops_the_broker_command_and_its_tansu(tmp_path: Path) -> None:
    """`bundlegnn broker` under SIGTERM (docker stop, systemd) stops tansu too instead of orphaning it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "BUNDLEGNN_PATHS__STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "bundlegnn.cli", "broker"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        addr, deadline = tmp_path / "broker.addr", time.time() + 60
        while not addr.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert addr.exists(), proc.stderr.read() if proc.poll() is not None else "no broker address in 60 s"
        children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        assert children  # tansu
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for child in children:
            assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        assert not addr.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_reports_name_the_settings_the_environment_changed_but_no_paths_or_secrets(monkeypatch) -> None:
    """An evaluation report's command names each BUNDLEGNN_ override (a run is reproducible from it); paths and
    anything that looks like a secret are left out."""
    from bundlegnn.cli import _environment_overrides

    for name in [k for k in os.environ if k.startswith("BUNDLEGNN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BUNDLEGNN_TRAINING__GNN_BUDGET_S", "600")
    monkeypatch.setenv("BUNDLEGNN_SCORING__TOP_K", "10")
    monkeypatch.setenv("BUNDLEGNN_PATHS__STATE_DIR", "/tmp/x")
    monkeypatch.setenv("BUNDLEGNN_STREAM__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("OTHER_SETTING", "1")
    assert _environment_overrides() == ["BUNDLEGNN_SCORING__TOP_K=10", "BUNDLEGNN_TRAINING__GNN_BUDGET_S=600"]


def test_kafka_security_from_the_environment_reaches_both_client_libraries(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Managed Kafka takes SASL over TLS: the settings a deployment gives in its environment become the same
    options for kafka-python and aiokafka, and the same credentials for the worker's Faust app; the password
    shows nowhere. (The TLS connection itself: tests/test_end_to_end.py.)"""
    import ssl

    import trustme
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streaming.worker import broker_credentials

    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for key, value in {"PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512", "SASL_USERNAME": "shop",
                       "SASL_PASSWORD": "hunter2", "SSL_CAFILE": str(tmp_path / "ca.pem")}.items():
        monkeypatch.setenv(f"BUNDLEGNN_STREAM__SECURITY__{key}", value)
    settings = load_settings(ROOT / "configs" / "production.yaml")
    options = settings.stream.security.client_options()
    context = options.pop("ssl_context")
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "shop", "sasl_plain_password": "hunter2"}
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # the shop's CA only, not the system's
    faust_options = dict(credentials_to_aiokafka_auth(broker_credentials(settings.stream.security)))
    assert isinstance(faust_options.pop("ssl_context"), ssl.SSLContext) and faust_options == options
    assert "hunter2" not in settings.model_dump_json() + repr(settings)

    monkeypatch.setenv("BUNDLEGNN_STREAM__SECURITY__SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="stream.security.ssl_cafile .*missing.pem"):
        load_settings(ROOT / "configs" / "production.yaml").stream.security.client_options()
    result = CliRunner().invoke(app, ["replay", "--config", "configs/production.yaml"])
    assert result.exit_code == 2 and "stream.security.ssl_cafile" in result.output


def test_kafka_security_that_cannot_connect_is_refused_with_its_keys(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming.settings import KafkaSecurity

    assert KafkaSecurity().client_options() == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(ValueError, match="SASL_SSL needs sasl_username and sasl_password"):
        KafkaSecurity(protocol="SASL_SSL", sasl_username="shop")
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile go together"):
        KafkaSecurity(protocol="SSL", ssl_certfile=tmp_path / "client.pem")
    with pytest.raises(ValueError, match="ssl_cafile set but protocol is PLAINTEXT"):
        KafkaSecurity(ssl_cafile=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="stream.security.protocol"):
        monkeypatch.setenv("BUNDLEGNN_STREAM__SECURITY__PROTOCOL", "TLS")
        load_settings(None)
    monkeypatch.setenv("BUNDLEGNN_STREAM__SECURITY__PROTOCOL", "SSL")  # the embedded broker serves plaintext
    monkeypatch.setenv("BUNDLEGNN_PATHS__STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["replay", "--config", "configs/default.yaml"])
    assert result.exit_code == 2 and "embedded broker serves PLAINTEXT" in result.output


def test_kafka_servers_are_host_port_and_spaces_after_commas_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client gets the same list: Faust turned ' k2:9092' into a broker URL with a space in it."""
    monkeypatch.setenv("BUNDLEGNN_STREAM__BOOTSTRAP_SERVERS", " k1:9092, k2:9092 ")
    assert load_settings(None).stream.bootstrap_servers == "k1:9092,k2:9092"
    for wrong in ("k1:9092,", "k1", "k1:kafka", "k1:0"):
        monkeypatch.setenv("BUNDLEGNN_STREAM__BOOTSTRAP_SERVERS", wrong)
        with pytest.raises(ConfigError, match="stream.bootstrap_servers: .* is not host:port"):
            load_settings(None)
