"""Configuration: unknown keys and missing secrets fail at start-up naming the path; secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.config import Settings, load_config, parse_config
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
