"""The server registry (goflow/servers.py) and the `server`/`tools` CLI commands."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path

import pytest

from goflow import servers
from goflow.cli.server_commands import add_parsers
from goflow.servers import ServerSpecError

TEST_SERVER = str(Path(__file__).resolve().parent / "mcp_test_server.py")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GOFLOW_HOME", str(tmp_path / "gf"))
    return tmp_path / "gf"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="goflow")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_config_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GOFLOW_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "x"))
    assert servers.config_dir() == tmp_path / "a"
    monkeypatch.delenv("GOFLOW_HOME")
    assert servers.config_dir() == tmp_path / "x" / "goflow"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert servers.config_dir() == tmp_path / "h" / ".config" / "goflow"


def test_add_list_remove(home):
    assert servers.load_registry() == {}
    servers.add_server({"id": "fs", "command": "npx", "args": ["-y", "pkg", "/data"], "env": {"T": "${env.TOK}"}})
    servers.add_server({"id": "web", "transport": "http", "url": "https://example.com/mcp"})
    reg = servers.load_registry()
    assert set(reg) == {"fs", "web"}
    assert reg["fs"]["transport"] == "stdio"  # omitted transport means stdio
    assert reg["fs"]["env"] == {"T": "${env.TOK}"}  # stored unexpanded
    path = home / "servers.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ServerSpecError, match="already registered"):
        servers.add_server({"id": "fs", "command": "other"})
    servers.add_server({"id": "fs", "command": "other"}, replace=True)
    assert servers.load_registry()["fs"]["command"] == "other"
    servers.remove_server("fs")
    assert set(servers.load_registry()) == {"web"}
    with pytest.raises(ServerSpecError, match="no server 'fs'"):
        servers.remove_server("fs")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"command": "x"}, "'id' is required"),
        ({"id": "1abc", "command": "x"}, "invalid id"),
        ({"id": "a b", "command": "x"}, "invalid id"),
        ({"id": "s"}, "needs a 'command'"),
        ({"id": "s", "transport": "http"}, "needs a 'url'"),
        ({"id": "s", "transport": "sse", "url": "ftp://x"}, "http:// or https://"),
        ({"id": "s", "transport": "http", "url": "http://x", "command": "c"}, "only used by the stdio"),
        ({"id": "s", "transport": "carrier-pigeon", "command": "c"}, "invalid transport"),
        ({"id": "s", "command": "c", "args": "not-a-list"}, "list of strings"),
        ({"id": "s", "command": "c", "bogus": 1}, "unknown key"),
    ],
)
def test_validation_messages(spec, message):
    problems = servers.validate_spec(spec)
    assert any(message in p for p in problems), problems


def test_valid_ids():
    for sid in ("a", "fs", "my-server_2", "Z9"):
        assert servers.validate_spec({"id": sid, "command": "x"}) == []


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("GF_TOKEN", "tkn")
    assert servers.expand_env_refs({"A": "Bearer ${env.GF_TOKEN}", "B": "plain"}, server_id="s") == {
        "A": "Bearer tkn",
        "B": "plain",
    }
    monkeypatch.delenv("GF_TOKEN")
    with pytest.raises(ServerSpecError) as info:
        servers.expand_env_refs({"A": "${env.GF_TOKEN}"}, server_id="s", field="headers")
    assert "GF_TOKEN" in str(info.value) and "headers" in str(info.value)


def test_cli_add_list_remove(home, capsys):
    assert run_cli(["server", "add", "t", "--env", "A=1", sys.executable, TEST_SERVER, "-x"]) == 0
    reg = servers.load_registry()
    assert reg["t"]["command"] == sys.executable
    assert reg["t"]["args"] == [TEST_SERVER, "-x"]  # args after COMMAND are passed verbatim
    assert reg["t"]["env"] == {"A": "1"}
    assert run_cli(["server", "add", "web", "--transport", "http", "--url", "http://127.0.0.1:9/mcp",
                    "--header", "Authorization=Bearer ${env.T}"]) == 0
    assert servers.load_registry()["web"]["headers"] == {"Authorization": "Bearer ${env.T}"}
    capsys.readouterr()
    assert run_cli(["server", "list", "--json"]) == 0
    listed = {s["id"]: s for s in json.loads(capsys.readouterr().out)}
    assert listed["web"]["headers"] == ["Authorization"]  # names only, never values
    assert run_cli(["server", "list"]) == 0
    out = capsys.readouterr().out
    assert "web" in out and "http://127.0.0.1:9/mcp" in out
    assert run_cli(["server", "add", "bad", "--transport", "http"]) == 1
    assert "needs --url" in capsys.readouterr().err
    assert run_cli(["server", "add", "9bad", "cmd"]) == 1
    assert run_cli(["server", "remove", "web"]) == 0
    assert run_cli(["server", "remove", "web"]) == 1
    assert set(servers.load_registry()) == {"t"}


def test_cli_server_test_and_tools(home, capsys):
    assert run_cli(["server", "add", "t", sys.executable, TEST_SERVER]) == 0
    capsys.readouterr()
    assert run_cli(["server", "test", "t"]) == 0
    out = capsys.readouterr().out
    assert "server 't' OK" in out
    assert "add(a: integer, b: integer)" in out
    assert run_cli(["tools", "t", "--json"]) == 0
    tools = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert tools["add"]["input_schema"]["required"] == ["a", "b"]
    # failures exit 1 with a clear message
    assert run_cli(["server", "add", "broken", "/nonexistent/mcp-server"]) == 0
    capsys.readouterr()
    assert run_cli(["server", "test", "broken"]) == 1
    err = capsys.readouterr().err
    assert "broken" in err and "connection" in err
    assert run_cli(["tools", "unknown"]) == 1
    assert "no server 'unknown'" in capsys.readouterr().err
