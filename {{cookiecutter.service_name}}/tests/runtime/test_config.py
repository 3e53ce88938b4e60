"""Configuration from the environment. Template-owned; do not edit."""

from __future__ import annotations

from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.runtime.config import ENV_PREFIX, load_settings
from {{ cookiecutter.package_name }}.runtime.errors import ConfigError


def test_defaults_need_no_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.broker_url == "memory://"
    assert settings.state_url == "memory://"


def test_values_come_from_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}BATCH_SIZE", "7")
    monkeypatch.setenv(f"{ENV_PREFIX}LOG_LEVEL", "debug")
    settings = load_settings()
    assert (settings.batch_size, settings.log_level) == (7, "DEBUG")


def test_secrets_can_come_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "broker-url"
    secret.write_text("memory://from-file\n")
    monkeypatch.setenv(f"{ENV_PREFIX}BROKER_URL_FILE", str(secret))
    assert load_settings().broker_url == "memory://from-file"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("BROKER_URL", "redis://x", "BROKER_URL: unknown scheme"),
        ("STATE_URL", "zookeeper://x", "STATE_URL: unknown scheme"),
        ("BATCH_SIZE", "-1", "BATCH_SIZE: Input should be greater than 0"),
        ("BATCH_SIZE", "many", "BATCH_SIZE: Input should be a valid integer"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: Input should be"),
        ("RETRY_MAX_BACKOFF_MS", "1", "RETRY_MAX_BACKOFF_MS must be >="),
        ("DEAD_LETTER_TOPIC", "{nope}.dlq", "DEAD_LETTER_TOPIC: use only the placeholders"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(ENV_PREFIX + name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_unreadable_secret_file_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}BROKER_URL_FILE", "/nonexistent/secret")
    with pytest.raises(ConfigError, match="BROKER_URL_FILE: cannot read /nonexistent/secret"):
        load_settings()


def test_broker_tls_context_comes_from_the_tls_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from {{ cookiecutter.package_name }}.runtime.brokers.tls import tls_context

    assert tls_context(load_settings(), required=False) is None
    context = tls_context(load_settings(), required=True)
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setenv(f"{ENV_PREFIX}BROKER_TLS_CA_FILE", "/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="BROKER_TLS_CA_FILE: no such file"):
        tls_context(load_settings(), required=False)
