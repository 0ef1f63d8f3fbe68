"""Configuration: unknown keys and missing secrets fail at start-up naming the path; secrets never print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dispatcher.backoff import PollPolicy
from dispatcher.config import Settings, TargetConfig, load_config, parse_config, read_settings
from dispatcher.errors import ConfigError

GOOD = {"targets": {"hostup": {"provider": "hostup", "base_url": "https://cloud.hostup.se/api/v2",
                               "api_key_env": "HOSTUP_API_KEY"}}}
ENV = {"HOSTUP_API_KEY": "sekret-value-123456"}


def test_valid_file_resolves_the_secret_from_the_environment() -> None:
    config = parse_config(GOOD, Settings(), env=ENV)
    target = config.target("hostup")
    assert target.api_key.get_secret_value() == "sekret-value-123456"
    assert (target.rate_count, target.rate_period_s) == (60, 60.0)


@pytest.mark.parametrize(("data", "path"), [
    ({"targets": {"hostup": {**GOOD["targets"]["hostup"], "api_kye": "x"}}}, "targets.hostup.api_kye: unknown key"),
    ({"targetz": {}}, "targetz: unknown key"),
    ({"targets": {"hostup": {**GOOD["targets"]["hostup"], "retry": {"max_attempt": 3}}}},
     "targets.hostup.retry.max_attempt: unknown key"),
    ({"targets": {"h": {"provider": "zendesk", "base_url": "https://x", "api_key_env": "K"}}},
     "targets.h.provider"),
    ({"targets": {"h": {"provider": "hostup", "base_url": "ftp://x", "api_key_env": "K"}}}, "targets.h.base_url"),
    ({"targets": {"h": {"provider": "hostup", "base_url": "https://x", "api_key_env": "K", "rate": "lots"}}},
     "targets.h.rate"),
    ({"targets": {"h": {"provider": "hostup", "base_url": "https://x"}}}, "api_key_env or api_key_file"),
    ({"api": {"tokens": {"t": {"token_env": "T", "scopes": ["everything"]}}}}, "api.tokens.t.scopes.0"),
])
def test_invalid_file_is_refused_naming_the_key_path(data: dict, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Settings(), env={"K": "v", "T": "v", **ENV})
    assert path in str(info.value)


def test_missing_secret_names_the_key_and_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"targets\.hostup\.api_key_env: environment variable HOSTUP_API_KEY"):
        parse_config(GOOD, Settings(), env={})


def test_secret_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file-secret\n")
    data = {"targets": {"h": {"provider": "nocworx", "base_url": "https://portal.nexcess.net",
                              "api_key_file": str(key_file)}}}
    assert parse_config(data, Settings(), env={}).target("h").api_key.get_secret_value() == "from-file-secret"


def test_secrets_never_appear_in_reprs_or_errors() -> None:
    config = parse_config(GOOD, Settings(), env=ENV)
    assert "sekret-value-123456" not in repr(config)
    assert "sekret-value-123456" not in str(config.target("hostup"))
    assert "sekret-value-123456" not in repr(config.target("hostup").api_key)


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Settings(config=tmp_path / "nope.toml"), env={})


def test_load_config_reports_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text("[targets\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Settings(config=path), env={})


def test_no_database_or_broker_means_the_embedded_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=None, broker_url=None)
    assert settings.embedded
    assert settings.resolved_database_url().startswith("sqlite:///")


# -- [targets.X.poll]: the NocWorx poll schedule -------------------------------------------------

NOCWORX = {"provider": "nocworx", "base_url": "https://portal.nexcess.net", "api_key_env": "K"}


def poll_target(poll: dict[str, Any] | None = None) -> TargetConfig:
    data = {"targets": {"n": {**NOCWORX, **({"poll": poll} if poll is not None else {})}}}
    return parse_config(data, Settings(), env={"K": "v"}).target("n")


@pytest.mark.parametrize(("poll", "expected"), [
    (None, PollPolicy(first_s=0.5, interval_s=1.0, growth=0.1, max_interval_s=30.0)),
    ({"interval_s": 2, "deadline_s": 600}, PollPolicy(first_s=0.5, interval_s=2.0, growth=0.1, max_interval_s=30.0)),
    ({"interval_s": 0.2}, PollPolicy(first_s=0.2, interval_s=0.2)),   # the first look is never later than that
    ({"first_s": 1, "interval_s": 0.2}, PollPolicy(first_s=1.0, interval_s=0.2)),
    ({"first_s": 5, "interval_s": 5, "growth": 0}, PollPolicy(first_s=5.0, interval_s=5.0, growth=0.0)),
    ({"first_s": 0.25, "interval_s": 0.5, "growth": 0.2, "max_interval_s": 120},
     PollPolicy(first_s=0.25, interval_s=0.5, growth=0.2, max_interval_s=120.0)),
])
def test_poll_settings_become_the_targets_schedule(poll: dict[str, Any] | None, expected: PollPolicy) -> None:
    target = poll_target(poll)
    assert target.poll_policy == expected
    assert target.poll_interval_s == expected.interval_s
    assert target.poll_deadline_s == float((poll or {}).get("deadline_s", 900))


def test_fixed_interval_polling_is_growth_zero_with_the_first_look_at_the_interval() -> None:
    policy = poll_target({"first_s": 5, "interval_s": 5, "growth": 0}).poll_policy
    assert [policy.wait(e) for e in (0, 5, 10, 300, 899)] == [5, 5, 5, 5, 5]


@pytest.mark.parametrize(("poll", "path"), [
    ({"first_s": 0}, "targets.n.poll.first_s: Input should be greater than 0"),
    ({"interval_s": -1}, "targets.n.poll.interval_s: Input should be greater than 0"),
    ({"growth": -0.1}, "targets.n.poll.growth: Input should be greater than or equal to 0"),
    ({"growth": float("nan")}, "targets.n.poll.growth"),
    ({"max_interval_s": float("inf")}, "targets.n.poll.max_interval_s"),
    ({"max_interval_s": 0}, "targets.n.poll.max_interval_s"),
    ({"deadline_s": 0}, "targets.n.poll.deadline_s"),
    ({"growth": "fast"}, "targets.n.poll.growth"),
    ({"grwoth": 0.1}, "targets.n.poll.grwoth: unknown key"),
    ({"interval_s": 10, "max_interval_s": 5}, "targets.n.poll.max_interval_s: must not be less than interval_s (10)"),
    ({"first_s": 10, "max_interval_s": 5}, "targets.n.poll.max_interval_s: must not be less than first_s (10)"),
])
def test_bad_poll_settings_fail_naming_the_key_path(poll: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        poll_target(poll)
    assert path in str(info.value)


def test_a_bad_environment_setting_is_refused_naming_the_variable_and_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_DB_CONNECTIONS", "0")
    monkeypatch.setenv("DISPATCHER_API_PORT", "eighty")
    with pytest.raises(ConfigError) as caught:
        read_settings()
    message = str(caught.value)
    assert "DISPATCHER_DB_CONNECTIONS: Input should be greater than or equal to 1 (got '0')" in message
    assert "DISPATCHER_API_PORT: Input should be a valid integer" in message and "'eighty'" in message


def test_the_cli_reports_a_bad_environment_setting_as_a_configuration_error_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dispatcher.cli import EXIT_CONFIG, main

    monkeypatch.setenv("DISPATCHER_DB_CONNECTIONS", "many")
    result = CliRunner().invoke(main, ["worker", "--pool", "threads"])
    assert result.exit_code == EXIT_CONFIG
    assert "DISPATCHER_DB_CONNECTIONS" in result.output and "Traceback" not in result.output


def test_the_hot_path_connections_of_a_worker_default_to_64() -> None:
    assert Settings().db_connections == 64
