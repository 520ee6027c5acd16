"""The dashboard page in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright; no browser download). Real coordinator, workers and gateway processes.

The workflows wait on files the test creates, so "as it happens" is proven by states the
page shows while a node is still blocked, never by timing."""

from __future__ import annotations

import os
import uuid

import pytest

from goflow.events.monitor import Monitor
from goflow.language.loader import load
from goflow.web.server import GatewayProcess
from webtools import gateways, get_json, published_runtime  # noqa: F401 (gateways: a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; make test does it as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(180)
WAIT_MS = 60_000
HOSTILE = "<script>window.pwned=1</script></textarea><img src=x onerror=\"window.pwned=2\">&amp;"

FAILING_FLOW = """
name: web-page
variables:
  - {name: items, type: array, default: [1, 2, 3]}
  - {name: counter, type: string}
  - {name: gate1, type: string}
  - {name: gate2, type: string}
  - {name: hostile, type: string}
nodes:
  - {id: start, type: start}
  - {id: first, type: python, call: "flowlib:wait_for_file", args: ["${gate1}"], output: opened}
  - id: each
    type: loop
    collection: items
    item: n
    body: [square]
    output: squares
  - {id: square, type: python, call: "flowlib:add", args: ["${n}", "${n}"], output: sq}
  - id: flaky
    type: python
    call: "flowlib:flaky"
    args: ["${counter}", 1]
    retry: {max_attempts: 2, initial_delay: 10ms}
    output: attempts
  - {id: second, type: python, call: "flowlib:wait_for_file", args: ["${gate2}"]}
  - {id: boom, type: python, call: "flowlib:fail", args: [kaboom]}
  - {id: end, type: end}
edges:
  - {from: start, to: first}
  - {from: first, to: each}
  - {from: each, to: flaky}
  - {from: flaky, to: second}
  - {from: second, to: boom}
  - {from: boom, to: end}
"""

RESULT_FLOW = """
name: web-result
variables:
  - {name: hostile, type: string}
  - {name: api_key, type: string, secret: true}
nodes:
  - {id: start, type: start}
  - {id: copy, type: python, call: "flowlib:echo", args: ["${hostile}"], output: echoed}
  - {id: end, type: end, return: "${echoed}"}
edges:
  - {from: start, to: copy}
  - {from: copy, to: end}
"""

GATED_LOOP = """
name: web-restart
variables:
  - {name: gate, type: string}
  - {name: items, type: array, default: [1, 2, 3, 4, 5, 6, 7, 8]}
nodes:
  - {id: start, type: start}
  - {id: hold, type: python, call: "flowlib:wait_for_file", args: ["${gate}"]}
  - id: each
    type: loop
    collection: items
    item: n
    body: [step]
    output: outs
  - {id: step, type: python, call: "flowlib:timed", args: [0.05, "${n}"], output: s}
  - {id: end, type: end}
edges:
  - {from: start, to: hold}
  - {from: hold, to: each}
  - {from: each, to: end}
"""


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        yield context
        context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.errors = errors
    yield page
    page.close()


@pytest.fixture
def runtime(free_ports):
    yield from published_runtime(free_ports)



def _node(page, node_id: str, status: str) -> None:
    page.wait_for_selector(f'#node-list .row[data-node="{node_id}"][data-status="{status}"]', timeout=WAIT_MS)


def test_live_run_with_loop_retry_and_failure_then_a_result(runtime, gateways, free_ports, write_flow, tmp_path, page):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp)
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"
    variables = {"counter": str(tmp_path / "counter"), "gate1": str(gate1), "gate2": str(gate2), "hostile": HOSTILE}
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(FAILING_FLOW)), variables, execution_id=eid)

    page.goto(f"http://127.0.0.1:{port}/#/e/{eid}")
    page.evaluate("window.__sameDocument = true")
    _node(page, "first", "running")                       # the page shows it while it runs
    for later in ("each", "square", "flaky", "second", "boom", "end"):
        _node(page, later, "pending")
    page.click('#node-list .row[data-node="first"]')
    page.wait_for_function("() => document.getElementById('nd-logs').textContent.includes('waiting line 2')",
                           timeout=WAIT_MS)               # node.log lines in the node panel, live
    gate1.touch()
    _node(page, "first", "completed")
    _node(page, "second", "running")                      # blocked: everything before it is on the page now
    _node(page, "each", "completed")
    page.wait_for_selector('#node-list .row[data-node="each"]:has-text("3/3")', timeout=WAIT_MS)
    _node(page, "square", "completed")
    _node(page, "flaky", "completed")
    for later in ("boom", "end"):
        _node(page, later, "pending")
    assert page.is_hidden("#ex-outcome")

    page.click('#node-list .row[data-node="flaky"]')      # the retry, in the node panel
    page.wait_for_selector('#nd-attempts .attempt[data-attempt="2"][data-status="completed"]', timeout=WAIT_MS)
    first_attempt = page.locator('#nd-attempts .attempt[data-attempt="1"]')
    assert first_attempt.get_attribute("data-status") == "retrying"
    assert "transient failure 1" in first_attempt.inner_text()
    assert page.locator('#timeline .row[data-node="flaky"]').count() == 2

    gate2.touch()
    page.wait_for_selector("#ex-outcome.failed:not([hidden])", timeout=WAIT_MS)   # the failure panel
    assert "at node boom" in page.inner_text("#ex-outcome-title")
    assert "kaboom" in page.inner_text("#ex-result")
    _node(page, "boom", "failed")
    _node(page, "end", "pending")                         # never reached
    assert page.inner_text("#ex-status") == "failed"
    page.click('#node-list .row[data-node="boom"]')
    error = page.locator("#nd-attempts .error-box")
    assert "kaboom" in error.inner_text() and "Traceback" in error.inner_text()
    assert future.result(timeout=60)["status"] == "failed"

    # the hostile value is text in the variables panel, and ran nowhere
    hostile_cell = page.locator('#vars-rows tr[data-var="hostile"] pre')
    assert hostile_cell.inner_text() == HOSTILE

    # time travel: as of the first attempt of flaky, "attempts" was not set yet; as of its output, it was
    page.fill("#log-types", "node.started")
    page.fill("#log-nodes", "flaky")
    page.wait_for_function("() => document.querySelectorAll('#log .row').length === 2", timeout=WAIT_MS)
    page.focus("#log")
    page.keyboard.press("Home")
    page.keyboard.press("Enter")
    assert "as of" in page.inner_text("#vars-asof")
    assert page.locator('#vars-rows tr[data-var="attempts"]').count() == 0
    assert page.locator('#vars-rows tr[data-var="squares"]').count() == 1
    page.click("#vars-now")
    assert page.locator('#vars-rows tr[data-var="attempts"] pre').inner_text() == "2"

    # a second execution completes: its result is shown, as text
    rid = uuid.uuid4().hex
    secret = "sk-" + uuid.uuid4().hex
    _, done = runtime.coordinator.submit(load(write_flow(RESULT_FLOW, "result.yaml")),
                                         {"hostile": HOSTILE, "api_key": secret}, execution_id=rid)
    assert done.result(timeout=60)["status"] == "completed"
    page.goto(f"http://127.0.0.1:{port}/#/")                # same document: only the hash changes
    page.wait_for_selector(f'#exec-rows tr[data-execution="{rid}"][data-status="completed"]', timeout=WAIT_MS)
    assert page.locator(f'#exec-rows tr[data-execution="{eid}"][data-status="failed"]').count() == 1
    page.click(f'#exec-rows tr[data-execution="{rid}"] a')
    page.wait_for_selector("#ex-outcome.completed:not([hidden])", timeout=WAIT_MS)
    assert page.inner_text("#ex-result") == HOSTILE
    page.wait_for_selector('#vars-rows tr[data-var="api_key"]', timeout=WAIT_MS)
    assert page.locator('#vars-rows tr[data-var="api_key"] pre').inner_text() == "***"   # masked as in events
    assert secret not in page.content()
    assert page.evaluate("window.__sameDocument") is True    # never reloaded
    assert page.evaluate("window.pwned") is None
    assert page.locator("#main img, #main script").count() == 0
    assert page.errors == []                                 # no script error, no CSP violation


def test_executions_list_updates_live(runtime, gateways, free_ports, write_flow, tmp_path, page):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp)
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector("#exec-empty:not([hidden])", timeout=WAIT_MS)
    gate = tmp_path / "gate"
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(GATED_LOOP)), {"gate": str(gate)}, execution_id=eid)
    page.wait_for_selector(f'#exec-rows tr[data-execution="{eid}"][data-status="running"]', timeout=WAIT_MS)
    gate.touch()
    page.wait_for_selector(f'#exec-rows tr[data-execution="{eid}"][data-status="completed"]', timeout=WAIT_MS)
    assert future.result(timeout=60)["status"] == "completed"
    page.click("#nav-workers")
    page.wait_for_selector("#worker-rows tr", timeout=WAIT_MS)
    assert page.locator("#worker-rows tr").count() == 2


def test_a_big_run_is_aggregated_and_renders_only_visible_rows(runtime, gateways, free_ports, write_flow, page):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp)
    n = 1500
    text = "name: big\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n" + "".join(
        f'  - {{id: n{i}, type: python, call: "flowlib:noop"}}\n' for i in range(n)) + "edges:\n" + "".join(
        f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}\n" for i in range(n))
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(text, "big.yaml")), {}, execution_id=eid)
    page.goto(f"http://127.0.0.1:{port}/#/e/{eid}")
    page.wait_for_selector("#ex-outcome.completed:not([hidden])", timeout=WAIT_MS)
    assert future.result(timeout=60)["status"] == "completed"
    assert page.is_hidden("#graph") and page.is_visible("#aggregate")      # no 1,500-node drawing
    page.wait_for_selector(f'#aggregate .cell:has-text("completed {n + 2}")', timeout=WAIT_MS)
    assert 0 < page.locator("#node-list .row").count() < 40                  # visible rows only
    assert 0 < page.locator("#log .row").count() < 40
    total = len(page.evaluate("window.goflowDashboard.view().events"))
    assert page.inner_text("#log-count") == str(total) and total > 2 * n
    page.focus("#node-list")                                                 # keyboard: End, Enter
    page.keyboard.press("End")
    page.keyboard.press("Enter")
    assert page.inner_text("#nd-id") == f"n{n - 1}"


def test_gateway_killed_mid_run_page_resumes_with_the_exact_stream(runtime, gateways, free_ports, write_flow,
                                                                   tmp_path, page):
    (port,) = free_ports(1)
    gateway = gateways(port, runtime.events_tcp, runtime.control_tcp)
    gate = tmp_path / "gate"
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(GATED_LOOP)), {"gate": str(gate)}, execution_id=eid)
    page.goto(f"http://127.0.0.1:{port}/#/e/{eid}")
    page.evaluate("window.__sameDocument = true")
    _node(page, "hold", "running")
    page.wait_for_selector("#connection.live", timeout=WAIT_MS)

    gateway.process.kill()                                   # the gateway dies mid-run...
    gateway.process.wait()
    page.wait_for_selector("#connection.down", timeout=WAIT_MS)
    gate.touch()                                             # ...the run goes on without it...
    assert future.result(timeout=60)["status"] == "completed"
    gateways(port, runtime.events_tcp, runtime.control_tcp)  # ...and it comes back

    page.wait_for_selector("#ex-outcome.completed:not([hidden])", timeout=WAIT_MS)
    _node(page, "each", "completed")
    with Monitor(runtime.events_tcp, runtime.control_tcp) as mon:
        stream = [(ev.seq, ev.type) for ev in mon.replay(eid)]
    shown = [tuple(pair) for pair in page.evaluate(
        "window.goflowDashboard.view().events.map(e => [e.seq, e.type])")]
    assert shown == stream                                   # same count, same order: no gap, no duplicate
    assert page.inner_text("#log-count") == str(len(stream))
    assert page.evaluate("window.__sameDocument") is True


def test_page_needs_the_token_off_loopback(runtime, free_ports, page):
    (port,) = free_ports(1)
    token = "page-token-" + uuid.uuid4().hex
    gateway = GatewayProcess(f"0.0.0.0:{port}", runtime.events_tcp, runtime.control_tcp, token=token)
    gateway.start()
    try:
        response = page.goto(f"http://127.0.0.1:{port}/")
        assert response.status == 401 and "token" in page.inner_text("body")
        page.goto(f"http://127.0.0.1:{port}/?token={token}")  # once: the token moves into a cookie
        assert "token=" not in page.url
        page.wait_for_selector("#connection.live", timeout=WAIT_MS)   # the EventSource authenticated too
        page.wait_for_selector("#exec-empty:not([hidden])", timeout=WAIT_MS)
        assert get_json(f"http://127.0.0.1:{port}/api/executions")[0] == 401   # without the cookie: refused
    finally:
        gateway.stop()
        page.context.clear_cookies()


def test_a_run_whose_first_events_left_the_ring_shows_its_variables_from_the_base(runtime, gateways, free_ports,
                                                                                 write_flow, page):
    """A gateway holding 200 events, a run of ~500: the page's stream starts mid-run, so it
    takes the variables op's snapshot as its base (docs/events.md §1) and shows every
    variable, those set by events it never saw included; it says which past snapshots it
    cannot know."""
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp, buffer=200)
    n = 120
    chain = ["start", *(f"n{i}" for i in range(n)), "end"]
    text = "name: long\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n" + "".join(
        f'  - {{id: n{i}, type: python, call: "flowlib:echo", args: [{i}], output: v{i}}}\n' for i in range(n)) + \
        "edges:\n" + "".join(f"  - {{from: {a}, to: {b}}}\n" for a, b in zip(chain, chain[1:]))
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(text, "long.yaml")), {}, execution_id=eid)
    assert future.result(timeout=120)["status"] == "completed"
    page.goto(f"http://127.0.0.1:{port}/#/e/{eid}")
    page.wait_for_selector("#ex-outcome.completed:not([hidden])", timeout=WAIT_MS)
    first = page.evaluate("window.goflowDashboard.view().events[0].eseq")
    assert first > n                   # the ring no longer held the run's first ~n/3 changes
    page.wait_for_selector(f'#vars-rows tr[data-var="v{n - 1}"]', timeout=WAIT_MS)
    shown = {row.get_attribute("data-var"): row.inner_text().split()[-1]
             for row in page.locator("#vars-rows tr").all()}
    assert shown == {f"v{i}": str(i) for i in range(n)}
    # An event from before the base, pressed and released on two renderings of its row (the
    # list re-renders on every frame while events arrive or it scrolls): still selected.
    box = page.evaluate("""async () => {
        const log = window.goflowDashboard.view().log;
        log.follow = false;
        log.container.scrollTop = 0;
        const frame = () => new Promise((done) => requestAnimationFrame(done));
        await frame(); await frame();
        const row = log.container.querySelector('.row[data-index="0"]');
        row.scrollIntoView({block: "nearest"});
        const r = row.getBoundingClientRect();
        return {x: r.x, y: r.y, width: r.width, height: r.height};
    }""")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.evaluate("window.goflowDashboard.view().log.render()")
    page.mouse.up()
    assert "not known here" in page.inner_text("#vars-asof")
    assert page.locator("#vars-rows tr").count() == 0
    assert not page.errors
