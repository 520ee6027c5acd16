"""deploy/: every manifest parses and only uses commands and flags that exist."""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
UNIT_FILES = sorted(DEPLOY.rglob("*.service"))


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from goflow.cli import build_parser
    from goflow.cli.remote import add_parsers
    from goflow.coordinator.daemon import build_parser as coordinator_parser
    from goflow.workers.cli import build_parser as worker_parser

    goflow = build_parser()
    sub = next(a for a in goflow._actions if isinstance(a, argparse._SubParsersAction))
    if "submit" not in sub.choices:
        add_parsers(sub)
    return {"goflow-coordinator": coordinator_parser(), "goflow-worker": worker_parser(), "goflow": goflow}


class _Exit(Exception):
    pass


def check_command(argv: list[str], where: str) -> None:
    """Parse ``argv`` with the real parser of its program (placeholders replaced by dummies)."""
    program = Path(argv[0]).name
    parser = _parsers()[program]
    args = [re.sub(r"\$\{?[A-Za-z_]+\}?", "x", a).replace("%H", "host").replace("%i", "inst") for a in argv[1:]]
    for i, a in enumerate(args):  # numeric options given through variables
        if args[i - 1] in ("--concurrency", "--credits", "--local-workers") and a == "x":
            args[i] = "2"
        elif args[i - 1] == "--labels" and a == "x":
            args[i] = "k=v"
    errors: list[str] = []

    def error(message: str) -> None:
        errors.append(message)
        raise _Exit()

    parser.error = error  # type: ignore[method-assign]
    try:
        parser.parse_args(args)
    except _Exit:
        pass
    assert not errors, f"{where}: `{' '.join(argv)}`: {errors}"


def commands_in(node, where: str) -> list[tuple[list[str], str]]:
    """Every command list/string in a YAML document that runs goflow-coordinator/goflow-worker."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("command", "args", "entrypoint") and isinstance(value, (list, str)):
                argv = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
                if argv and Path(argv[0]).name in ("goflow-coordinator", "goflow-worker", "goflow"):
                    found.append((argv, f"{where}:{key}"))
            else:
                found += commands_in(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += commands_in(item, f"{where}[{index}]")
    return found


def test_there_is_something_to_check():
    names = {p.name for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"goflow-coordinator.service", "goflow-worker@.service", "Dockerfile", "compose.yaml"} <= names
    assert len(YAML_FILES) >= 4


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_and_uses_real_flags(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents
    for document in documents:
        assert isinstance(document, dict)
        if path.parent.name == "kubernetes":
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
    commands = [c for d in documents for c in commands_in(d, path.name)]
    for argv, where in commands:
        check_command(argv, where)
    if path.name == "compose.yaml":
        services = documents[0]["services"]
        assert {"coordinator", "worker"} <= set(services)
        for service in services.values():
            assert service["stop_signal"] == "SIGTERM"
        assert len(commands) == 2


def test_kubernetes_shape():
    kinds = {}
    for path in (DEPLOY / "kubernetes").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                kinds.setdefault(document["kind"], []).append(document)
    assert {"Deployment", "Service", "Secret"} <= set(kinds)
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    coordinator = deployments["goflow-coordinator"]
    assert coordinator["spec"]["replicas"] == 1 and coordinator["spec"]["strategy"]["type"] == "Recreate"
    for deployment in deployments.values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert "livenessProbe" in container
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert any("secret" in v for v in volumes), "keys must come from a Secret"
    service_ports = {p["port"] for p in kinds["Service"][0]["spec"]["ports"]}
    assert service_ports == {5555, 5556, 5557}


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    text = path.read_text().replace("\\\n", " ")  # line continuations
    parser.read_string(text, source=str(path))
    return parser


@pytest.mark.parametrize("path", UNIT_FILES, ids=lambda p: p.name)
def test_systemd_units_parse_are_hardened_and_use_real_flags(path):
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}.items():
        assert service.get(key) == value, f"{path.name}: {key}"
    assert service.get("DynamicUser") == "yes" or service.get("User"), "a dedicated or dynamic user"
    assert service.get("KillSignal") == "SIGTERM"
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name in ("goflow-coordinator", "goflow-worker")
    check_command(argv, f"{path.name}:ExecStart")
    if path.name == "goflow-coordinator.service":
        assert "HUP" in service["ExecReload"]


def test_dockerfile_commands_exist():
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "STOPSIGNAL", "ARG",
             "LABEL"}
    assert all(parts[0] in known for parts in instructions), instructions
    cmds = [json.loads(parts[1]) for parts in instructions if parts[0] in ("CMD", "ENTRYPOINT")]
    assert cmds
    for argv in cmds:
        if Path(argv[0]).name in _parsers():
            check_command([a for a in argv if a != "--help"], "Dockerfile")
    exposed = {int(p) for parts in instructions if parts[0] == "EXPOSE" for p in parts[1].split()}
    assert exposed == {5555, 5556, 5557}


def test_checker_catches_a_made_up_flag():
    with pytest.raises(AssertionError):
        check_command(["goflow-worker", "--connect", "tcp://x:1", "--no-such-flag"], "self-test")
    with pytest.raises(AssertionError):
        check_command(["goflow-coordinator", "--bind", "x"], "self-test")
