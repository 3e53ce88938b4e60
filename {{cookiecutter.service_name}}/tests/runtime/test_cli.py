"""The command line, run as a subprocess like an operator or a probe would. Template-owned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }} import SERVICE_NAME, TEMPLATE_VERSION
from {{ cookiecutter.package_name }}.runtime.app import event_registry
from {{ cookiecutter.package_name }}.runtime.asyncapi import baked_broker
from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, PACKAGE_NAME


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    clean[f"{ENV_PREFIX}HEARTBEAT_FILE"] = str(tmp_path / "heartbeat")
    clean[f"{ENV_PREFIX}LOG_FORMAT"] = "json"
    return clean


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", PACKAGE_NAME, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_is_healthy_then_drains_and_exits_zero_on_sigterm(env: dict[str, str]) -> None:
    heartbeat = Path(env[f"{ENV_PREFIX}HEARTBEAT_FILE"])
    process = subprocess.Popen(
        [sys.executable, "-m", PACKAGE_NAME, "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not heartbeat.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no heartbeat within 30 s"
            time.sleep(0.05)
        assert cli(env, "healthcheck").returncode == 0
        assert cli(env, "healthcheck", "--live").returncode == 0
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    events = [line["event"] for line in lines]
    assert events[:2] == ["starting", "started"]
    # What a fleet-wide log query finds the oldest services by.
    assert lines[0]["template_version"] == TEMPLATE_VERSION
    assert lines[0]["version"] == version(SERVICE_NAME)
    assert "stop requested" in events
    assert events[-1] == "stopped"
    unhealthy = cli(env, "healthcheck")
    assert unhealthy.returncode == 1
    assert "no heartbeat" in unhealthy.stderr


def test_stale_or_not_ready_heartbeat_fails_the_right_probe(env: dict[str, str]) -> None:
    heartbeat = Path(env[f"{ENV_PREFIX}HEARTBEAT_FILE"])
    heartbeat.write_text(json.dumps({"time": time.time(), "ready": False}))
    assert cli(env, "healthcheck").returncode == 1
    assert cli(env, "healthcheck", "--live").returncode == 0
    heartbeat.write_text(json.dumps({"time": time.time() - 3600, "ready": True}))
    stale = cli(env, "healthcheck", "--live")
    assert stale.returncode == 1
    assert "stuck" in stale.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BATCH_SIZE", "0"), ("BROKER_URL", "nats://localhost"), ("DRAIN_TIMEOUT_S", "soon")],
)
def test_bad_setting_is_one_line_without_traceback(
    env: dict[str, str], variable: str, value: str
) -> None:
    env[ENV_PREFIX + variable] = value
    result = cli(env, "run")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{SERVICE_NAME}: error: {ENV_PREFIX}{variable}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_version_names_the_installed_distribution_and_the_template(env: dict[str, str]) -> None:
    result = cli(env, "--version")
    assert result.returncode == 0
    [line] = result.stdout.splitlines()
    assert line == f"{SERVICE_NAME} {version(SERVICE_NAME)} (template {TEMPLATE_VERSION})"


def test_emit_publishes_an_event_built_from_json(env: dict[str, str]) -> None:
    event_type = event_registry().names()[0]
    result = cli(env, "emit", event_type, "{}", "--key", "k-1", "--id", "e-1")
    assert result.returncode == 0, result.stderr
    # The memory bus of a process of its own: no consumer is bound there.
    assert json.loads(result.stdout) == {
        "id": "e-1",
        "type": event_type,
        "key": "k-1",
        "topic": event_type,
        "routed": False,
        "parked_in": "memory bus",
    }
    assert f"no consumer is bound for {event_type}" in result.stderr
    from_stdin = cli(env, "emit", event_type, stdin="{}")
    assert from_stdin.returncode == 0, from_stdin.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("no.such.Type", "{}"), "unknown event type 'no.such.Type'"),
        (("TYPE", "{not json"), "payload is not a valid"),
        (("TYPE", '{"no_such_field": 1}'), "payload is not a valid"),
    ],
)
def test_emit_refuses_bad_input_in_one_line(
    env: dict[str, str], args: tuple[str, str], expected: str
) -> None:
    event_type = event_registry().names()[0]
    result = cli(env, "emit", *(event_type if arg == "TYPE" else arg for arg in args))
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_demo_shows_every_outcome(env: dict[str, str]) -> None:
    result = cli(env, "demo")
    assert result.returncode == 0, result.stderr
    for expected in (
        "duplicates dropped: 1",
        "unknown-type",
        "undecodable",
        "oversized",
        "bus outage",
        "nothing left on the bus",
    ):
        assert expected in result.stdout


@pytest.mark.parametrize(
    ("args", "variables", "expected"),
    [
        (("tail", "--type", "no.such.*"), {}, "--type 'no.such.*' matches no event type"),
        (("dlq", "redrive", "--type", "Nope"), {}, "--type 'Nope' matches no event type"),
        (("replay", "--since", "yesterday"), {}, "--since 'yesterday' is not a time"),
        (("replay", "--since", "1h", "--until", "2h"), {}, "--until '2h' is not after"),
        (("tail", "--count", "0"), {}, "'0' is not a whole number above 0"),
        (("tail", "--payload", "--json"), {}, "not allowed with argument"),
        (("dlq", "purge"), {}, "invalid choice: 'purge'"),
        (("dlq", "show"), {}, "the following arguments are required: id"),
        (("tail",), {"BROKER_URL": "nats://127.0.0.1:4222"}, "BROKER_URL"),
    ],
)
def test_operator_commands_refuse_bad_arguments_in_one_line(
    env: dict[str, str], args: tuple[str, ...], variables: dict[str, str], expected: str
) -> None:
    env.update({ENV_PREFIX + name: value for name, value in variables.items()})
    result = cli(env, *args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", [("tail",), ("dlq", "list"), ("dlq", "redrive"), ("replay",)])
def test_operator_commands_have_help(env: dict[str, str], command: tuple[str, ...]) -> None:
    result = cli(env, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {SERVICE_NAME} {' '.join(command)}")
    assert "--json" in result.stdout


def test_config_check_names_variables_that_are_not_settings(
    env: dict[str, str], tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "values.env").write_text(
        f"{ENV_PREFIX}BATCH_SIZE=100\n"
        f"{ENV_PREFIX}BROKER_URL_FILE=/run/secrets/broker-url\n"
        f"# renamed in an update:\n{ENV_PREFIX}OLD_CONCURRENCY=16\n"
    )
    (overlay / "patch.yaml").write_text(f"- name: {ENV_PREFIX}BATCH_SIZES\n  value: '1'\n")
    result = cli(env, "config", "--check", str(overlay))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{overlay / 'patch.yaml'}:1: {ENV_PREFIX}BATCH_SIZES is not a setting of this service "
        "(renamed or removed?)",
        f"{overlay / 'values.env'}:4: {ENV_PREFIX}OLD_CONCURRENCY is not a setting of this "
        "service (renamed or removed?)",
    ]
    assert "CHANGELOG.md" in result.stderr


def test_config_check_passes_the_services_own_files(env: dict[str, str]) -> None:
    """The deployment files and docs name only settings the service has."""
    root = Path(__file__).resolve().parents[2]
    shipped = [root / name for name in ("deploy", "docker-compose.yml", "README.md", "docs")]
    result = cli(env, "config", "--check", *map(str, shipped))
    assert (result.returncode, result.stdout) == (0, "")


def test_config_check_of_a_missing_path_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    result = cli(env, "config", "--check", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    missing = tmp_path / "nowhere"
    assert result.stderr == f"{SERVICE_NAME}: error: {missing}: no such file or folder\n"


def test_asyncapi_documents_the_handled_and_own_types_without_credentials(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The document's validity against the AsyncAPI schema is the template's test."""
    from {{ cookiecutter.package_name }}.handlers import router

    url = "kafka://k1:9092,k2:9092" if baked_broker() == "kafka" else "amqp://u:secret@mq:5672/v"
    env[f"{ENV_PREFIX}BROKER_URL"] = url
    written = cli(env, "asyncapi", "--output", str(tmp_path / "asyncapi.json"))
    assert written.returncode == 0, written.stderr
    text = (tmp_path / "asyncapi.json").read_text()
    assert "secret" not in text
    document = json.loads(text)
    assert document["asyncapi"] == "3.0.0"
    [server] = document["servers"].values()
    assert server["host"] in ("k1:9092,k2:9092", "mq:5672")
    receive = {
        op["channel"]["$ref"].rpartition("/")[2]
        for op in document["operations"].values()
        if op["action"] == "receive"
    }
    assert receive == set(router.event_types())
    sent = {op["action"] for op in document["operations"].values()}
    assert sent <= {"receive", "send"}

    unwritable = cli(env, "asyncapi", "--output", str(tmp_path / "no" / "such" / "dir.json"))
    assert unwritable.returncode == 1
    assert unwritable.stderr.startswith(f"{SERVICE_NAME}: error: cannot write ")
    assert "Traceback" not in unwritable.stderr
