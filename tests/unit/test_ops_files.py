"""The files that run it for real: alert rules, dashboard, runbooks, compose file, Dockerfile, examples.

promtool and a compose client are needed for two of the checks; `.ci/run` installs them (Debian's
`prometheus` and `docker-compose` packages) when missing, so under CI=true a missing tool fails the
run instead of skipping. Everything else (YAML structure, image names, metric names) needs none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from dispatcher import metrics
from dispatcher.config import Settings, parse_config

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
COMPOSE = ROOT / "docker-compose.yml"
IN_CI = os.environ.get("CI", "").lower() == "true"

#: official images the compose file may use: name -> how a pinned (exact release) tag looks
PINNED_IMAGES = {
    "postgres": re.compile(r"^\d+\.\d+(-(bookworm|bullseye|alpine\d*(\.\d+)*))?$"),
    "redis": re.compile(r"^\d+\.\d+\.\d+(-(bookworm|bullseye|alpine\d*(\.\d+)*))?$"),
    "prom/prometheus": re.compile(r"^v\d+\.\d+\.\d+$"),
    "grafana/grafana": re.compile(r"^\d+\.\d+\.\d+$"),
}


def tool(name: str, install: str) -> str:
    """The tool's path; skipped outside CI when absent, a failure in CI (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({install})"
        if IN_CI:
            pytest.fail(message + ": .ci/run should have installed it", pytrace=False)
        pytest.skip(message)
    return path


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) when it works, else Debian's `docker-compose`, else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# -- metric names in PromQL ------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan",
             # aggregation operators: `sum by (x) (...)` puts the clause between the name and its "("
             "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
             "quantile"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                          # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                                     # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)                                    # range selectors
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(0), text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_names_are_read_out_of_promql_without_functions_labels_or_keywords() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, target) (rate(dispatcher_attempt_duration_seconds_bucket'
            '{target=~"$target", op="create"}[5m]))) / on (target) group_left sum(up) and absent(foo_bar)')
    assert metric_names(expr) == {"dispatcher_attempt_duration_seconds_bucket", "up", "foo_bar"}


# -- alert rules -------------------------------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool_check() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    tests = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in checks if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{rule['alert']}: no test where it stays quiet"


def test_the_prometheus_configuration_scrapes_all_three_roles_and_loads_the_rules() -> None:
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"dispatcher-api", "dispatcher-worker", "dispatcher-scheduler"}
    promtool = shutil.which("promtool")
    if promtool:
        result = subprocess.run([promtool, "check", "config", str(OPS / "prometheus" / "prometheus.yml")],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_name_only_metrics_the_service_exports() -> None:
    exported = metrics.exported_names()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']} uses {sorted(names - exported)}, not exported"


# -- runbooks ----------------------------------------------------------------------------------------

def cli_commands() -> set[str]:
    """Every `dispatcher ...` command path: 'intents list', 'targets resume', 'worker' ..."""
    from dispatcher.cli import main

    paths: set[str] = set()

    def walk(group: click.Group, prefix: str) -> None:
        for name, command in group.commands.items():
            paths.add(f"{prefix}{name}")
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")

    walk(main, "")
    return paths


def test_every_alert_has_a_runbook_whose_commands_exist() -> None:
    commands = cli_commands()
    for rule in alert_rules():
        path = ROOT / rule["annotations"]["runbook"]
        assert path == OPS / "runbooks" / f"{rule['alert']}.md", rule["alert"]
        text = path.read_text()
        assert text.startswith(f"# {rule['alert']}\n")
        for heading in ("**What it means.**", "**What to look at.**", "**What fixes it.**"):
            assert heading in text, f"{path.name}: no {heading}"
        used = re.findall(r"`dispatcher ([a-z][a-z -]*?)(?: [<-]|`|\s*#)", text)
        used += re.findall(r"^dispatcher ([a-z][a-z -]*?)(?: [<-]|\s*#|$)", text, flags=re.M)
        assert used, f"{path.name} names no dispatcher command"
        groups = {c.split()[0] for c in commands if " " in c}
        for command in used:
            words = command.strip().split()
            # a group's next word must be one of its subcommands
            two_words = words[0] in groups and len(words) > 1
            known = " ".join(words[:2]) in commands if two_words else words[0] in commands
            assert known, f"{path.name}: `dispatcher {command}` is not a command"


# -- dashboard ---------------------------------------------------------------------------------------

def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((OPS / "grafana" / "dispatcher.json").read_text())
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    walk(board["panels"])
    return found


def test_the_dashboard_loads_and_every_panel_queries_exported_metrics() -> None:
    board = json.loads((OPS / "grafana" / "dispatcher.json").read_text())
    assert board["uid"] == "dispatcher" and board["title"] == "dispatcher"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels), "every panel has a query"
    exported = metrics.exported_names()
    used: set[str] = set()
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"panel {title!r}: {expr}"
        assert names <= exported, f"panel {title!r} uses {sorted(names - exported)}, not exported"
        used |= names
    # and the dashboard shows every family the service exports
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


# -- compose and Docker ------------------------------------------------------------------------------

def test_the_compose_file_passes_docker_compose_config() -> None:
    command = compose_command()
    if command is None:
        message = "neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)"
        if IN_CI:
            pytest.fail(message + ": .ci/run should have installed it", pytrace=False)
        pytest.skip(message)
    for profiles in ([], ["--profile", "simulators", "--profile", "monitoring"]):
        result = subprocess.run([*command, "-f", str(COMPOSE), *profiles, "config", "-q"], cwd=ROOT,
                                capture_output=True, text=True, check=False, env={**os.environ, "COMPOSE_PROFILES": ""})
        assert result.returncode == 0, f"{' '.join(command)} config {' '.join(profiles)}: {result.stderr}"


def test_the_compose_file_runs_every_role_on_pinned_official_images() -> None:
    data = compose()
    services = data["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "api", "worker", "scheduler", "simulators"}
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            assert service["build"] == {"context": ".", "dockerfile": "ops/Dockerfile"}, name
            continue
        repository, _, tag = image.partition(":")
        assert repository in PINNED_IMAGES, f"{name}: {image} is not one of the official images used here"
        assert PINNED_IMAGES[repository].match(tag), f"{name}: {image} is not pinned to a release tag"
    # the stores: health-checked, on named volumes; Redis durable and never evicting
    for name in ("postgres", "redis"):
        assert "healthcheck" in services[name], name
        for volume in services[name]["volumes"]:
            assert volume.split(":")[0] in data["volumes"], f"{name}: {volume} is not a named volume"
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    # a one-shot migration that the others wait for
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "scheduler"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    # workers scale: nothing that fixes one container
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["command"][0] == "worker"
    # one scheduler, the simulators only when asked for
    assert services["scheduler"]["command"] == ["scheduler"]
    assert services["scheduler"].get("deploy", {}).get("replicas", 1) == 1
    assert services["simulators"]["profiles"] == ["simulators"]
    assert services["simulators"]["command"][0] == "simulate"


def test_the_compose_file_passes_secrets_as_files_the_example_configuration_reads() -> None:
    data = compose()
    secrets = data["secrets"]
    example_dir = OPS / "secrets.example"
    for name, spec in secrets.items():
        default = re.sub(r"\$\{DISPATCHER_SECRETS_DIR:-([^}]*)\}", r"\1", spec["file"])
        assert (ROOT / default).resolve() == (example_dir / name).resolve(), name
        assert (example_dir / name).is_file(), name
    for toml_name in ("dispatcher.toml.example", "dispatcher.simulators.toml"):
        text = (OPS / toml_name).read_text()
        named = set(re.findall(r'"/run/secrets/([a-z_]+)"', text))
        assert named and named <= set(secrets), f"{toml_name}: {sorted(named - set(secrets))} not in compose"
    for service in ("api", "worker", "scheduler", "migrate"):
        assert set(data["services"][service]["secrets"]) == set(secrets), service


@pytest.mark.parametrize("name", ["dispatcher.toml.example", "dispatcher.simulators.toml"])
def test_the_example_configurations_are_valid(name: str, tmp_path: Path) -> None:
    text = (OPS / name).read_text().replace("/run/secrets/", f"{OPS / 'secrets.example'}/")
    config = parse_config(tomllib.loads(text), Settings(), env={}, source=OPS / name)
    assert set(config.targets) == {"hostup", "nocworx"}
    assert {t.provider.value for t in config.targets.values()} == {"hostup", "nocworx"}
    assert config.tokens


def test_the_simulator_knobs_use_the_example_keys() -> None:
    knobs = json.loads((OPS / "simulators.json").read_text())
    assert knobs["hostup_key"] == (OPS / "secrets.example" / "hostup_api_key").read_text()
    assert knobs["nocworx_key"] == (OPS / "secrets.example" / "nocworx_api_key").read_text()


def test_the_dockerfile_is_pinned_non_root_and_copies_only_what_it_needs() -> None:
    text = (OPS / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-bookworm)?", base.group(1)), base.group(1)
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert stages and all(s == "${PYTHON_IMAGE}" for s in stages)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    copied = {source for line in text.splitlines() if line.startswith("COPY ") and "--from=" not in line
              for source in line.split()[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "dispatcher", "migrations"}  # never the whole context
    # no secret is baked in: nothing that looks like a key, token or password is set at build time
    for line in text.splitlines():
        if line.startswith(("ENV", "ARG")) or line.startswith("    DISPATCHER_"):
            assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*=", line, flags=re.I), line
