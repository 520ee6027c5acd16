"""goflow executions / execution / logs / prune, on a history written by the real publisher."""

from __future__ import annotations

import argparse
import json
import time
import uuid

import pytest

from goflow.cli import history
from goflow.cli.watch import event_json
from goflow.events.codec import decode_event
from goflow.history.store import Store, open_store
from tests.test_store import EmbeddedWithSink, Publisher

pytestmark = pytest.mark.timeout(90)


def goflow(*argv: str) -> int:
    """Parse like ``goflow`` would once ``history.add_parsers`` is in build_parser."""
    parser = argparse.ArgumentParser(prog="goflow")
    sub = parser.add_subparsers(dest="command")
    history.add_parsers(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def db(tmp_path):
    """A history with three runs (two of workflow 'demo', one failed 'other'); returns (path, ids)."""
    path = tmp_path / "history.db"
    store = Store(path)
    pub = Publisher(store.sink)
    ids = {"ok": pub.run("abcd" + uuid.uuid4().hex[4:], workflow="demo"),
           "ok2": pub.run("abce" + uuid.uuid4().hex[4:], workflow="demo"),
           "failed": pub.run(workflow="other", outcome="failed"),
           "running": pub.run(workflow="demo", finish=False)}
    store.record_submission(ids["ok"], "demo", "name: demo\nnodes: []\n", {"x": 1})
    pub.close()
    store.close()
    return str(path), ids


def test_executions_lists_full_ids(db, capsys):
    path, ids = db
    assert goflow("executions", "--db", path) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["EXECUTION", "WORKFLOW", "STATUS", "DURATION", "STARTED"]
    for eid in ids.values():
        assert eid in out                                   # never truncated
    row = next(line for line in lines if ids["failed"] in line)
    assert "other" in row and "failed" in row and "500.0ms" in row

    assert goflow("executions", "--db", path, "--json", "--workflow", "demo") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["execution_id"] for r in rows} == {ids["ok"], ids["ok2"], ids["running"]}
    assert goflow("executions", "--db", path, "--json", "--status", "failed") == 0
    assert [r["execution_id"] for r in json.loads(capsys.readouterr().out)] == [ids["failed"]]
    assert goflow("executions", "--db", path, "--json", "--since", "1h", "--limit", "2") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert goflow("executions", "--db", path, "--json", "--since", "2999-01-01") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert goflow("executions", "--db", path, "--since", "yesterday") == 2
    assert "--since" in capsys.readouterr().err


def test_executions_without_a_database(tmp_path, capsys):
    assert goflow("executions", "--db", str(tmp_path / "none.db"), "--json") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "[]" and "no history database" in captured.err
    assert not (tmp_path / "none.db").exists()


def test_execution_shows_nodes_attempts_and_result(db, capsys):
    path, ids = db
    assert goflow("execution", ids["ok"][:6], "--db", path) == 0
    out = capsys.readouterr().out
    assert ids["ok"] in out and "completed" in out and '{"ok": true}' in out
    assert "sha256" in out
    fetch = [line for line in out.splitlines() if line.startswith("fetch ")]
    assert len(fetch) == 2 and "ConnectionError: flaky" in fetch[0] and "w-1" in fetch[1]
    assert any(line.startswith("square[1]") for line in out.splitlines())
    assert "***" in out and "s3cret" not in out               # variables as stored (redacted)

    assert goflow("execution", ids["failed"], "--db", path, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "failed" and data["error"]["message"] == "ValueError: boom"
    assert [(n["node_id"], n["attempt"], n["status"]) for n in data["nodes"]][:2] == [
        ("fetch", 1, "failed"), ("fetch", 2, "completed")]

    assert goflow("execution", "abc", "--db", path) == 1      # too short
    assert "at least 4" in capsys.readouterr().err
    assert goflow("execution", "abc", "--db", path) == 1
    capsys.readouterr()
    assert goflow("execution", "ab", "--db", path) == 1
    capsys.readouterr()
    assert goflow("execution", "abcX"[:3] + "d", "--db", path) == 0   # 'abcd' is unambiguous
    capsys.readouterr()
    assert goflow("execution", "zzzz", "--db", path) == 1


def test_ambiguous_prefix_names_candidates(tmp_path, capsys):
    path = tmp_path / "h.db"
    store = Store(path)
    pub = Publisher(store.sink)
    a, b = pub.run("feed" + "1" * 28), pub.run("feed" + "2" * 28)
    pub.close()
    store.close()
    assert goflow("execution", "feed", "--db", str(path)) == 1
    err = capsys.readouterr().err
    assert "ambiguous" in err and a in err and b in err
    assert goflow("logs", "feed", "--db", str(path)) == 1


def test_logs_plain_and_json(db, capsys):
    path, ids = db
    reader = open_store(path)
    stored = reader.events(ids["ok"], with_topic=True)
    reader.close()

    assert goflow("logs", ids["ok"], "--db", path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(stored)
    assert lines[0].startswith("   +0.000s  execution.started")
    assert "node.retrying" in lines[4] and "fetch" in lines[4] and "next attempt 2" in lines[4]
    assert "attempt=2" in lines[5]
    assert any("square[1]" in line for line in lines)
    assert "execution.completed" in lines[-1]

    assert goflow("logs", ids["ok"], "--db", path, "--json") == 0
    out = capsys.readouterr().out.splitlines()
    expected = [event_json(decode_event(t, p)) for t, p in stored]   # exactly like goflow watch --json
    assert out == expected
    first = json.loads(out[0])
    assert first["topic"] == f"execution.started/{ids['ok']}/" and first["eseq"] == 1

    assert goflow("logs", ids["ok"], "--db", path, "--json", "--type", "node.started", "--node", "square") == 0
    picked = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["type"], e["node_id"], e["meta"]["index"]) for e in picked] == [
        ("node.started", "square", 0), ("node.started", "square", 1)]

    assert goflow("logs", "0000", "--db", path) == 1


def test_logs_follow_of_finished_run_just_prints(db, capsys, monkeypatch):
    path, ids = db
    monkeypatch.delenv("GOFLOW_EVENTS", raising=False)
    assert goflow("logs", ids["failed"], "--db", path, "--follow") == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1] == "execution.failed"
    # running, no endpoint: prints what is stored, then says how to follow
    assert goflow("logs", ids["running"], "--db", path, "--follow") == 1
    captured = capsys.readouterr()
    assert "GOFLOW_EVENTS" in captured.err and "node.skipped" in captured.out


SLOW = """
name: slow
nodes:
  - {id: start, type: start}
  - {id: first, type: python, call: "flowlib:add", args: [1, 2], output: a}
  - {id: nap, type: python, call: "flowlib:timed", args: [1.5, "${a}"], output: b}
  - {id: last, type: python, call: "flowlib:add", args: [3, 4], output: c}
  - {id: end, type: end, return: "${c}"}
edges:
  - {from: start, to: first}
  - {from: first, to: nap}
  - {from: nap, to: last}
  - {from: last, to: end}
"""


def test_logs_follow_joins_a_live_run_without_gap_or_duplicate(tmp_path, capsys, monkeypatch):
    from goflow.language.loader import load

    flow = tmp_path / "slow.yaml"
    flow.write_text(SLOW)
    workflow = load(flow)
    path = tmp_path / "history.db"
    store = Store(path)
    try:
        with EmbeddedWithSink(store.sink) as rt:
            monkeypatch.setenv("GOFLOW_EVENTS", rt.events_endpoint)
            monkeypatch.setenv("GOFLOW_COORDINATOR", rt.control_endpoint)
            eid, future = rt.coordinator.submit(workflow, {})
            # Wait until the history has the first events, not the end (pytest-timeout bounds it).
            while not store.events(eid, types=["node.started"], nodes=["nap"]):
                store.flush(1)
                time.sleep(0.01)
            stored_before = len(store.events(eid))
            assert goflow("logs", eid[:8], "--db", str(path), "--follow", "--json") == 0
            assert future.result(10)["status"] == "completed"
            published = rt.coordinator.call(lambda: rt.coordinator.publisher.replay(eid))
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["eseq"] for e in events] == list(range(1, len(published) + 1))   # no gap, no duplicate
        assert events[-1]["type"] == "execution.completed" and events[-1]["meta"]["result"] == 7
        assert len(events) > stored_before          # some came from the store, the rest live
        assert [event_json(decode_event(e["topic"], p)) for e, p in zip(events, published)] == \
            [json.dumps(e, separators=(",", ":")) for e in events]
    finally:
        store.close()


def test_prune_command(db, capsys):
    path, ids = db
    assert goflow("prune", "--keep-days", "30", "--db", path) == 0
    assert "pruned 0" in capsys.readouterr().out
    assert goflow("prune", "--keep-days", "0", "--db", path) == 0
    assert "pruned 3" in capsys.readouterr().out
    assert goflow("executions", "--db", path, "--json") == 0
    assert [r["execution_id"] for r in json.loads(capsys.readouterr().out)] == [ids["running"]]
    assert goflow("prune", "--keep-days", "-1", "--db", path) == 2
