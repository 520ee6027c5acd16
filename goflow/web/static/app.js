/* goflow dashboard: one static script, no build step.
 *
 * Everything shown about an execution is folded from its event stream (GET /api/events,
 * Server-Sent Events): node states, attempts, loop/parallel progress, logs, and the
 * variables as of any event (time travel replays the variable changes up to it). Values
 * from workflows only ever reach the page through textContent or cytoscape's canvas, never
 * as HTML. Long lists (nodes, attempts, events) render only their visible rows.
 */
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const BIG_GRAPH = 300;          // above this many nodes: aggregate instead of drawing the DAG
  const MAX_LOG_LINES = 500;      // per node, in the node panel
  const MAX_PANEL_ATTEMPTS = 30;  // attempts listed in the node panel (the latest)
  const NODE_STATUS = {
    "node.started": "running", "node.completed": "completed", "node.failed": "failed",
    "node.retrying": "retrying", "node.skipped": "skipped", "node.cancelled": "cancelled",
  };
  const ATTEMPT_END = new Set(["node.completed", "node.failed", "node.retrying", "node.cancelled"]);
  const TERMINAL = new Set(["execution.completed", "execution.failed", "execution.cancelled"]);
  const STATUS_ORDER = ["pending", "running", "retrying", "completed", "failed", "skipped", "cancelled"];
  const COLORS = {
    pending: "#c9ccd3", running: "#2f7de1", completed: "#2e9d58", failed: "#d23c3c",
    retrying: "#e48a1a", skipped: "#a4a9b3", cancelled: "#8a5cc2",
  };

  // -- small DOM helpers (text only) ----------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null) continue;
        if (key === "class") node.className = value;
        else if (key === "text") node.textContent = value;
        else if (key.startsWith("data-")) node.setAttribute(key, String(value));
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function show(node, visible) { node.hidden = !visible; }
  function pretty(value) {
    if (value === undefined) return "";
    if (typeof value === "string") return value;
    try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
  }
  function short(value, max) {
    const text = typeof value === "string" ? value : (value === undefined ? "" : JSON.stringify(value));
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }
  function when(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : ""; }
  function seconds(s) { return s === null || s === undefined ? "" : (s < 10 ? s.toFixed(2) : s.toFixed(1)) + " s"; }
  function badge(node, status) { node.textContent = status || ""; node.className = "badge st-" + (status || "pending"); }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (response.status === 401) setConnection("down", "token required: open /?token=TOKEN");
    if (!response.ok) throw Object.assign(new Error((body && body.error && body.error.message) || response.statusText),
                                          { status: response.status, body });
    return body;
  }
  function post(path, body) {
    return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });
  }

  function setConnection(kind, text) {
    const node = $("connection");
    node.className = "connection " + kind;
    node.textContent = text;
  }

  // -- the event stream, resumed by id --------------------------------------------------
  /* One EventSource; on a drop the browser reconnects with Last-Event-ID by itself. When it
   * gives up (the gateway was down), a new EventSource carries the last id as last_event_id. */
  class Stream {
    constructor(params, onEvent) {
      this.params = params;
      this.onEvent = onEvent;
      this.lastId = null;
      this.source = null;
      this.closed = false;
      this.retry = null;
      this.open();
    }
    open() {
      if (this.closed) return;
      const query = new URLSearchParams(this.params);
      if (this.lastId) query.set("last_event_id", this.lastId);
      const source = this.source = new EventSource("/api/events?" + query.toString());
      source.addEventListener("goflow", (message) => {
        this.lastId = message.lastEventId;
        this.onEvent(JSON.parse(message.data));
      });
      source.addEventListener("open", () => setConnection("live", "live"));
      source.addEventListener("gap", (message) => {   // the gateway no longer held what we missed
        const missed = JSON.parse(message.data).missed;
        setConnection("down", missed + " event(s) missed: reload for the history");
      });
      source.addEventListener("error", () => {
        if (this.closed) return;
        if (source.readyState === EventSource.CLOSED) {
          setConnection("down", "reconnecting…");
          clearTimeout(this.retry);
          this.retry = setTimeout(() => this.open(), 1000);
        } else {
          setConnection("down", "reconnecting…");
        }
      });
    }
    close() {
      this.closed = true;
      clearTimeout(this.retry);
      if (this.source) this.source.close();
    }
  }

  // -- a list that renders only its visible rows ----------------------------------------
  class VList {
    constructor(container, renderRow, onActivate, rowHeight) {
      this.container = container;
      this.renderRow = renderRow;
      this.onActivate = onActivate;
      this.rowHeight = rowHeight || 22;
      this.count = 0;
      this.selected = -1;
      this.follow = true;
      this.spacer = el("div", { class: "spacer" });
      clear(container);
      container.appendChild(this.spacer);
      this.pending = false;
      container.addEventListener("scroll", () => {
        const bottom = container.scrollTop + container.clientHeight >= this.spacer.offsetHeight - this.rowHeight;
        this.follow = bottom;
        this.schedule();
      });
      container.addEventListener("keydown", (event) => this.key(event));
      // Selection on the press, not on "click": rows are re-rendered on every animation
      // frame while events stream in or the list scrolls, and a click whose press and release
      // land on two renderings of a row is dispatched to the list, not to the row: lost.
      container.addEventListener("mousedown", (event) => {
        if (event.button !== 0) return;
        const row = event.target.closest(".row");
        if (row && row.dataset.index !== undefined) this.select(Number(row.dataset.index), true);
      });
    }
    setCount(count) {
      this.count = count;
      this.schedule();
    }
    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.render(); });
    }
    render() {
      const height = this.count * this.rowHeight;
      this.spacer.style.height = height + "px";
      if (this.follow && this.autoFollow) this.container.scrollTop = height;
      const top = this.container.scrollTop;
      const first = Math.max(0, Math.floor(top / this.rowHeight) - 5);
      const last = Math.min(this.count, Math.ceil((top + (this.container.clientHeight || 300)) / this.rowHeight) + 5);
      clear(this.spacer);
      for (let i = first; i < last; i++) {
        const row = this.renderRow(i);
        row.classList.add("row");
        if (i === this.selected) row.classList.add("selected");
        row.dataset.index = String(i);
        row.style.top = (i * this.rowHeight) + "px";
        row.setAttribute("role", "option");
        row.setAttribute("aria-selected", i === this.selected ? "true" : "false");
        this.spacer.appendChild(row);
      }
    }
    select(index, activate) {
      if (index < 0 || index >= this.count) return;
      this.selected = index;
      const top = index * this.rowHeight;
      if (top < this.container.scrollTop) this.container.scrollTop = top;
      else if (top + this.rowHeight > this.container.scrollTop + this.container.clientHeight) {
        this.container.scrollTop = top + this.rowHeight - this.container.clientHeight;
      }
      this.follow = false;
      this.render();
      if (activate && this.onActivate) this.onActivate(index);
    }
    key(event) {
      const page = Math.max(1, Math.floor(this.container.clientHeight / this.rowHeight) - 1);
      const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page };
      if (event.key in moves) {
        this.select(Math.min(this.count - 1, Math.max(0, (this.selected < 0 ? 0 : this.selected + moves[event.key]))), false);
        event.preventDefault();
      } else if (event.key === "Home") { this.select(0, false); event.preventDefault(); }
      else if (event.key === "End") { this.select(this.count - 1, false); event.preventDefault(); }
      else if (event.key === "Enter" || event.key === " ") {
        if (this.selected >= 0 && this.onActivate) this.onActivate(this.selected);
        event.preventDefault();
      }
    }
  }

  // -- variables: fold the changes ------------------------------------------------------
  /* docs/events.md "Variables": from eseq 1, the snapshot at an event is every earlier
   * variable.changed that changed the execution's variables (wire v2: its vseq equals its
   * eseq; a loop iteration's or branch's own scope has vseq != eseq). Wire v1 events carry
   * no vseq: every variable.changed counts. */
  function applyChanges(vars, ev) {
    if (ev.type !== "variable.changed") return;
    if (ev.vseq !== undefined && ev.vseq !== null && ev.vseq !== ev.eseq) return;
    const meta = ev.meta || {};
    if (meta.name !== undefined) vars[meta.name] = meta.value;
  }

  /* When the stream starts after eseq 1 (the gateway's ring no longer holds the
   * execution's first events), the base is the `variables` op's snapshot and its version
   * (vseq), and only later changes apply. An event from before the base has no exact
   * snapshot here (null). */
  function variablesAt(events, upto, base) {
    if (!base) {
      const vars = {};
      for (let i = 0; i <= upto; i++) applyChanges(vars, events[i]);
      return vars;
    }
    if ((events[upto].vseq || 0) < base.vseq) return null;
    const vars = Object.assign({}, base.vars);
    for (let i = 0; i <= upto; i++) if (events[i].eseq > base.vseq) applyChanges(vars, events[i]);
    return vars;
  }

  // -- the execution view ---------------------------------------------------------------
  let current = null;   // the open view: {close()}

  function contextKey(meta) {
    meta = meta || {};
    const parts = [];
    if (meta.loop !== undefined && meta.loop !== null) parts.push(meta.loop + "[" + meta.index + "]");
    if (meta.parallel !== undefined && meta.parallel !== null) parts.push(meta.parallel + "/" + meta.branch);
    return parts.join(" ");
  }

  class ExecutionView {
    constructor(id) {
      this.id = id;
      this.nodes = new Map();
      this.order = [];
      this.events = [];
      this.filtered = [];
      this.vars = {};
      this.snapshot = null;   // {vars, vseq}: the variables op's answer, from the detail
      this.base = null;       // the snapshot, once the stream turned out to start after eseq 1
      this.attempts = [];
      this.openAttempts = new Map();
      this.status = null;
      this.startTs = null;
      this.endTs = null;
      this.selectedNode = null;
      this.asOf = null;
      this.cy = null;
      this.dirtyNodes = new Set();
      this.dirty = false;
      this.logFilter = { types: null, nodes: null };
      this.branchEnds = new Map();
      this.stream = null;
      this.timer = null;
      this.build();
      this.load();
    }

    build() {
      $("ex-id").textContent = this.id;
      $("ex-workflow").textContent = "";
      badge($("ex-status"), "pending");
      $("ex-progress").textContent = "";
      show($("ex-outcome"), false);
      show($("node-detail"), false);
      show($("node-none"), true);
      show($("vars-now"), false);
      $("vars-asof").textContent = "now";
      clear($("vars-rows"));
      $("log-types").value = "";
      $("log-nodes").value = "";
      this.nodeList = new VList($("node-list"), (i) => this.nodeRow(i), (i) => this.selectNode(this.visibleNodes[i]));
      this.visibleNodes = [];
      this.timeline = new VList($("timeline"), (i) => this.attemptRow(i), null, 22);
      this.timeline.autoFollow = true;
      this.log = new VList($("log"), (i) => this.logRow(i), (i) => this.selectEvent(this.filtered[i]));
      this.log.autoFollow = true;
      this.listeners = [
        [$("node-search"), "input", () => this.refreshNodeList()],
        [$("log-types"), "input", () => this.setLogFilter()],
        [$("log-nodes"), "input", () => this.setLogFilter()],
        [$("vars-now"), "click", () => this.selectEvent(null)],
        [$("ex-cancel"), "click", () => this.cancel()],
      ];
      this.listeners.forEach(([node, type, fn]) => node.addEventListener(type, fn));
      $("node-search").value = "";
    }

    close() {
      if (this.stream) this.stream.close();
      clearInterval(this.timer);
      this.listeners.forEach(([node, type, fn]) => node.removeEventListener(type, fn));
      if (this.cy) this.cy.destroy();
      this.cy = null;
    }

    async load() {
      let detail;
      try {
        detail = await api("/api/executions/" + encodeURIComponent(this.id));
      } catch (e) {
        $("ex-workflow").textContent = "cannot load: " + e.message;
        return;
      }
      if (current !== this) return;
      $("ex-workflow").textContent = detail.workflow || "";
      if (detail.variables && typeof detail.variables_vseq === "number") {
        this.snapshot = { vars: detail.variables, vseq: detail.variables_vseq };
      }
      this.setGraph(detail.graph || { nodes: [], edges: [] });
      api("/api/metrics").then((m) => { this.control = m.control; this.renderHeader(); }).catch(() => {});
      if (detail.source === "history") {
        const page = await api("/api/executions/" + encodeURIComponent(this.id) + "/events");
        page.events.forEach((ev) => this.onEvent(ev));
      } else {
        this.stream = new Stream({ execution: this.id }, (ev) => this.onEvent(ev));
      }
      this.timer = setInterval(() => { if (this.status === "running") this.timeline.render(); }, 1000);
    }

    setGraph(graph) {
      this.graph = graph;
      const incomingSeq = new Set();
      const hasNext = new Set();
      const branchSets = new Map();
      graph.nodes.forEach((n) => {
        if (n.branch === null || n.branch === undefined) return;
        if (!branchSets.has(n.container)) branchSets.set(n.container, new Set());
        branchSets.get(n.container).add(n.branch);
      });
      this.branchCounts = new Map([...branchSets].map(([id, set]) => [id, set.size]));
      graph.edges.forEach((e) => { if (e.kind !== "edge") { incomingSeq.add(e.target); hasNext.add(e.source); } });
      graph.nodes.forEach((n) => {
        const node = { id: n.id, type: n.type, container: n.container, branch: n.branch, status: "pending",
                       attempt: 0, attempts: [], logs: [], progress: "", done: 0, count: null };
        this.nodes.set(n.id, node);
        this.order.push(n.id);
        if (n.branch !== null && n.branch !== undefined && !hasNext.has(n.id)) this.branchEnds.set(n.id, n.container);
      });
      $("node-count").textContent = "(" + graph.nodes.length + ")";
      this.refreshNodeList();
      const big = graph.nodes.length > BIG_GRAPH || typeof window.cytoscape !== "function";
      show($("graph"), !big);
      show($("aggregate"), big);
      if (big) { this.renderAggregate(); return; }
      if (window.cytoscapeDagre && !ExecutionView.registered) { window.cytoscape.use(window.cytoscapeDagre); ExecutionView.registered = true; }
      const elements = [];
      graph.nodes.forEach((n) => elements.push({ data: { id: n.id, label: n.id + "\n" + n.type, status: "pending" } }));
      graph.edges.forEach((e, i) => elements.push({ data: { id: "e" + i, source: e.source, target: e.target,
                                                            label: e.condition || "" }, classes: e.kind }));
      graph.nodes.forEach((n, i) => {
        if (n.container && !incomingSeq.has(n.id)) {
          elements.push({ data: { id: "c" + i, source: n.container, target: n.id, label: "" }, classes: "contains" });
        }
      });
      const style = [
        { selector: "node", style: { label: "data(label)", "text-wrap": "wrap", "text-valign": "center", "font-size": 10,
                                     shape: "round-rectangle", width: 110, height: 36, "background-color": COLORS.pending,
                                     color: "#111", "border-width": 1, "border-color": "#888" } },
        { selector: "edge", style: { width: 1.5, "curve-style": "bezier", "target-arrow-shape": "triangle",
                                     "line-color": "#99a", "target-arrow-color": "#99a", label: "data(label)",
                                     "font-size": 9, "text-background-color": "#fff", "text-background-opacity": 1 } },
        { selector: "edge.contains", style: { "line-style": "dashed" } },
        { selector: "edge.body, edge.branch", style: { "line-color": "#bbc", "target-arrow-color": "#bbc" } },
        { selector: "node:selected", style: { "border-width": 3, "border-color": "#ffb300" } },
      ];
      STATUS_ORDER.forEach((s) => style.push({ selector: 'node[status = "' + s + '"]',
                                               style: { "background-color": COLORS[s], color: s === "pending" || s === "skipped" ? "#111" : "#fff" } }));
      this.cy = window.cytoscape({
        container: $("graph"), elements, style, autoungrabify: true, boxSelectionEnabled: false,
        layout: window.cytoscapeDagre ? { name: "dagre", rankDir: "TB", nodeSep: 20, rankSep: 40 } : { name: "breadthfirst" },
      });
      this.cy.on("tap", "node", (event) => this.selectNode(event.target.id()));
    }

    // -- events ------------------------------------------------------------------------
    onEvent(ev) {
      if (!this.events.length && ev.eseq > 1) this.startAfterTheFirstEvents(ev);
      this.events.push(ev);
      if (this.matchesLog(ev)) this.filtered.push(this.events.length - 1);
      const node = ev.node_id ? this.nodes.get(ev.node_id) : null;
      const meta = ev.meta || {};
      if (ev.type === "execution.started" || ev.type === "execution.resumed") {
        this.status = "running";
        if (this.startTs === null) this.startTs = ev.ts;
      } else if (TERMINAL.has(ev.type)) {
        this.status = ev.status;
        this.endTs = ev.ts;
        this.outcome = ev;
      } else if (ev.type === "progress.update") {
        this.progress = meta;
      } else if (ev.type === "variable.changed" && (!this.base || ev.eseq > this.base.vseq)) {
        applyChanges(this.vars, ev);
      }
      if (this.startTs === null) this.startTs = ev.ts;
      if (node) this.onNodeEvent(node, ev, meta);
      this.dirty = true;
      this.scheduleRender();
    }

    /* The first event received is not the execution's first: fold onto the snapshot. One
     * taken before this event's variables version would miss changes: fetch a newer one. */
    startAfterTheFirstEvents(first) {
      this.base = this.snapshot || { vars: {}, vseq: 0 };
      this.vars = Object.assign({}, this.base.vars);
      if ((first.vseq || 0) > this.base.vseq) this.rebase();
    }

    async rebase() {
      let detail;
      try { detail = await api("/api/executions/" + encodeURIComponent(this.id)); } catch (e) { return; }
      if (current !== this || typeof detail.variables_vseq !== "number") return;
      this.base = { vars: detail.variables || {}, vseq: detail.variables_vseq };
      this.vars = variablesAt(this.events, this.events.length - 1, this.base) || Object.assign({}, this.base.vars);
      this.dirty = true;
      this.scheduleRender();
    }

    onNodeEvent(node, ev, meta) {
      const status = NODE_STATUS[ev.type];
      const key = ev.node_id + "|" + contextKey(meta) + "|" + ev.attempt;
      if (ev.type === "node.started") {
        const attempt = { node: ev.node_id, attempt: ev.attempt, context: contextKey(meta), status: "running",
                          start: ev.ts, end: null, worker: meta.worker || null, inputs: meta.inputs, output: undefined,
                          error: null };
        this.openAttempts.set(key, attempt);
        this.attempts.push(attempt);
        node.attempts.push(attempt);
      } else if (ATTEMPT_END.has(ev.type)) {
        const attempt = this.openAttempts.get(key);
        if (attempt) {
          this.openAttempts.delete(key);
          attempt.status = status;
          attempt.end = ev.ts;
          attempt.worker = meta.worker || attempt.worker;
          if (ev.type === "node.completed") attempt.output = meta.output;
          if (ev.error) attempt.error = ev.error;
        }
      } else if (ev.type === "node.log") {
        (meta.lines || []).forEach((line) => node.logs.push(line));
        if (node.logs.length > MAX_LOG_LINES * 2) node.logs.splice(0, node.logs.length - MAX_LOG_LINES);
      } else if (ev.type === "loop.started") {
        node.count = meta.count; node.done = 0;
      } else if (ev.type === "loop.iteration") {
        node.done = Math.max(node.done, (meta.index || 0) + 1);
      } else if (ev.type === "loop.completed") {
        node.done = meta.iterations; node.count = meta.count;
      }
      if (ev.type === "node.completed" && this.branchEnds.has(ev.node_id)) {
        const parallel = this.nodes.get(this.branchEnds.get(ev.node_id));
        if (parallel) { parallel.done += 1; this.dirtyNodes.add(parallel.id); }
      }
      if (status) {
        node.status = status;
        if (ev.attempt) node.attempt = ev.attempt;
        if (ev.error) node.error = ev.error;
      }
      this.dirtyNodes.add(node.id);
    }

    progressText(node) {
      if (node.type === "loop" && node.count !== null) return " " + node.done + "/" + node.count;
      if (node.type === "parallel") {
        const branches = this.branchCounts.get(node.id) || 0;
        return branches ? " " + node.done + "/" + branches + " branches" : "";
      }
      return "";
    }

    scheduleRender() {
      if (this.renderPending) return;
      this.renderPending = true;
      requestAnimationFrame(() => { this.renderPending = false; this.render(); });
    }

    render() {
      if (current !== this) return;
      this.renderNodeStates();
      this.nodeList.schedule();
      this.timeline.setCount(this.attempts.length);
      this.log.setCount(this.filtered.length);
      $("log-count").textContent = String(this.events.length);
      this.renderHeader();
      if (this.selectedNode) this.renderNode();
      if (this.asOf === null) this.renderVars(this.vars);
    }

    renderNodeStates() {
      if (!this.dirtyNodes.size) return;
      if (this.cy) {
        this.cy.batch(() => {
          this.dirtyNodes.forEach((id) => {
            const node = this.nodes.get(id);
            const item = this.cy.getElementById(id);
            if (!node || item.empty()) return;
            item.data("status", node.status);
            const retry = node.attempt > 1 ? " (attempt " + node.attempt + ")" : "";
            item.data("label", id + this.progressText(node) + "\n" + node.type + retry);
          });
        });
      } else if (Date.now() - (this.aggregatedAt || 0) > 250) {
        this.aggregatedAt = Date.now();   // O(nodes): at most 4 times a second on a big graph
        this.renderAggregate();
      } else {
        if (!this.later) this.later = setTimeout(() => { this.later = null; this.scheduleRender(); }, 260);
        return;
      }
      this.dirtyNodes.clear();
    }

    renderHeader() {
      badge($("ex-status"), this.status || "pending");
      const p = this.progress;
      $("ex-progress").textContent = p ? Math.round(p.percent) + "% · " + p.completed + " done, " + p.failed +
        " failed, " + p.running + " running, " + p.retries + " retries" : "";
      show($("ex-cancel"), !!this.control && this.status === "running");
      if (this.outcome) this.renderOutcome(this.outcome);
    }

    renderOutcome(ev) {
      const box = $("ex-outcome");
      box.className = "outcome " + (ev.type === "execution.completed" ? "completed" : ev.type === "execution.failed" ? "failed" : "cancelled");
      show(box, true);
      const duration = (ev.meta || {}).duration_s;
      if (ev.type === "execution.completed") {
        $("ex-outcome-title").textContent = "Completed in " + seconds(duration) + " · result";
        $("ex-result").textContent = pretty((ev.meta || {}).result);
      } else {
        const err = ev.error || {};
        $("ex-outcome-title").textContent = (ev.type === "execution.failed" ? "Failed" : "Cancelled") +
          (err.node_id ? " at node " + err.node_id : "") + " after " + seconds(duration);
        $("ex-result").textContent = (err.type ? err.type + ": " : "") + (err.message || "");
      }
    }

    renderAggregate() {
      const box = $("aggregate");
      const counts = {};
      const byType = {};
      this.nodes.forEach((n) => {
        counts[n.status] = (counts[n.status] || 0) + 1;
        const t = byType[n.type] = byType[n.type] || {};
        t[n.status] = (t[n.status] || 0) + 1;
      });
      clear(box);
      const cell = (title, c) => {
        const total = Object.values(c).reduce((a, b) => a + b, 0) || 1;
        const bar = el("div", { class: "bar" });
        STATUS_ORDER.forEach((s) => {
          if (!c[s]) return;
          const part = el("span", { title: s + ": " + c[s] });
          part.style.width = (100 * c[s] / total) + "%";
          part.style.background = COLORS[s];
          bar.appendChild(part);
        });
        const text = STATUS_ORDER.filter((s) => c[s]).map((s) => s + " " + c[s]).join(", ");
        return el("div", { class: "cell" }, el("strong", { text: title }), el("div", { class: "muted", text }), bar);
      };
      box.appendChild(cell("all " + this.nodes.size + " nodes", counts));
      Object.keys(byType).sort().forEach((t) => box.appendChild(cell(t, byType[t])));
    }

    // -- nodes -------------------------------------------------------------------------
    refreshNodeList() {
      const q = $("node-search").value.trim().toLowerCase();
      this.visibleNodes = q ? this.order.filter((id) => id.toLowerCase().includes(q)) : this.order;
      this.nodeList.setCount(this.visibleNodes.length);
    }

    nodeRow(i) {
      const node = this.nodes.get(this.visibleNodes[i]);
      const dot = el("span", { class: "dot" });
      dot.style.background = COLORS[node.status] || COLORS.pending;
      const retry = node.attempt > 1 ? " attempt " + node.attempt : "";
      return el("div", { "data-node": node.id, "data-status": node.status, class: node.id === this.selectedNode ? "selected" : "" },
                dot, node.id + " · " + node.type + " · " + node.status + retry + this.progressText(node));
    }

    selectNode(id) {
      if (!this.nodes.has(id)) return;
      this.selectedNode = id;
      if (this.cy) { this.cy.$(":selected").unselect(); this.cy.getElementById(id).select(); }
      this.nodeList.schedule();
      this.renderNode();
    }

    renderNode() {
      const node = this.nodes.get(this.selectedNode);
      show($("node-none"), false);
      show($("node-detail"), true);
      $("nd-id").textContent = node.id;
      $("nd-type").textContent = node.type + (node.container ? " in " + node.container : "") + this.progressText(node);
      badge($("nd-status"), node.status);
      const box = $("nd-attempts");
      clear(box);
      const shown = node.attempts.slice(-MAX_PANEL_ATTEMPTS);
      if (node.attempts.length > shown.length) {
        box.appendChild(el("p", { class: "muted", text: (node.attempts.length - shown.length) + " earlier attempts not shown" }));
      }
      shown.forEach((a) => {
        const head = "attempt " + a.attempt + (a.context ? " · " + a.context : "") + " · " + a.status +
          (a.worker ? " · " + a.worker : "") + (a.end ? " · " + seconds(a.end - a.start) : "");
        const part = el("div", { class: "attempt st-" + a.status, "data-attempt": a.attempt, "data-status": a.status },
                        el("strong", { text: head }));
        if (a.inputs !== undefined) part.appendChild(el("div", null, el("span", { class: "muted", text: "inputs" }), el("pre", { text: pretty(a.inputs) })));
        if (a.output !== undefined) part.appendChild(el("div", null, el("span", { class: "muted", text: "output" }), el("pre", { text: pretty(a.output) })));
        if (a.error) {
          part.appendChild(el("div", { class: "error-box" }, el("strong", { text: (a.error.type || "error") + ": " }),
                              a.error.message || "", a.error.traceback ? el("pre", { text: a.error.traceback }) : null));
        }
        box.appendChild(part);
      });
      if (!node.attempts.length && node.error) {
        box.appendChild(el("div", { class: "error-box" }, (node.error.type || "error") + ": " + (node.error.message || "")));
      }
      $("nd-logs").textContent = node.logs.slice(-MAX_LOG_LINES).map((l) =>
        (l.stream ? "[" + l.stream + "] " : "") + (l.text === undefined ? "" : l.text)).join("\n") || "(none)";
    }

    // -- the attempts timeline -----------------------------------------------------------
    attemptRow(i) {
      const a = this.attempts[i];
      const t0 = this.startTs || a.start;
      const t1 = Math.max(this.endTs || Date.now() / 1000, t0 + 0.001);
      const bar = el("span", { class: "bar", title: a.status + (a.worker ? " on " + a.worker : "") });
      bar.style.left = (100 * (a.start - t0) / (t1 - t0)) + "%";
      bar.style.width = (100 * ((a.end || t1) - a.start) / (t1 - t0)) + "%";
      bar.style.background = COLORS[a.status] || COLORS.running;
      const label = a.node + (a.context ? " " + a.context : "") + (a.attempt > 1 ? " #" + a.attempt : "") +
        (a.worker ? " @" + a.worker : "");
      return el("div", { "data-node": a.node, "data-status": a.status }, el("span", { class: "label", text: label, title: label }),
                el("span", { class: "track" }, bar));
    }

    // -- the event log and time travel ---------------------------------------------------
    setLogFilter() {
      const parse = (text) => { const parts = text.split(",").map((s) => s.trim()).filter(Boolean); return parts.length ? new Set(parts) : null; };
      this.logFilter = { types: parse($("log-types").value), nodes: parse($("log-nodes").value) };
      this.filtered = [];
      this.events.forEach((ev, i) => { if (this.matchesLog(ev)) this.filtered.push(i); });
      this.log.selected = -1;
      this.log.setCount(this.filtered.length);
    }

    matchesLog(ev) {
      const f = this.logFilter;
      if (f.types && !f.types.has(ev.type)) return false;
      if (f.nodes && !f.nodes.has(ev.node_id)) return false;
      return true;
    }

    logRow(i) {
      const ev = this.events[this.filtered[i]];
      const meta = ev.meta || {};
      let detail = "";
      if (ev.type === "variable.changed") detail = meta.name + " = " + short(meta.value, 60);
      else if (ev.error) detail = (ev.error.type || "") + ": " + short(ev.error.message, 80);
      else if (ev.type === "loop.iteration") detail = "index " + meta.index;
      else if (ev.type === "progress.update") detail = Math.round(meta.percent) + "%";
      else if (ev.type === "node.log") detail = (meta.lines || []).length + " line(s)";
      const cls = ev.type === "node.failed" || ev.type === "execution.failed" ? "ev-failed" : ev.type === "node.retrying" ? "ev-retrying" : "";
      return el("div", { class: cls, "data-seq": ev.seq, "data-type": ev.type },
                el("span", { class: "t", text: "#" + ev.eseq + " " + when(ev.ts) }),
                ev.type + (ev.node_id ? " " + ev.node_id : "") + (ev.attempt > 1 ? " a" + ev.attempt : "") +
                (contextKey(meta) ? " " + contextKey(meta) : "") + (detail ? " · " + detail : ""));
    }

    selectEvent(index) {
      this.asOf = index === undefined ? null : index;
      if (this.asOf === null) {
        $("vars-asof").textContent = "now";
        show($("vars-now"), false);
        this.renderVars(this.vars);
        return;
      }
      const vars = variablesAt(this.events, this.asOf, this.base);
      const ev = this.events[this.asOf];
      $("vars-asof").textContent = "as of #" + ev.eseq + " " + ev.type + (ev.node_id ? " " + ev.node_id : "") +
        (vars ? "" : ": not known here (the gateway no longer holds the events before #" + this.events[0].eseq + ")");
      show($("vars-now"), true);
      this.renderVars(vars || {});
      if (ev.node_id && this.nodes.has(ev.node_id)) this.selectNode(ev.node_id);
    }

    renderVars(vars) {
      const body = $("vars-rows");
      clear(body);
      Object.keys(vars).sort().forEach((name) => {
        body.appendChild(el("tr", { "data-var": name }, el("td", { text: name }), el("td", null, el("pre", { text: pretty(vars[name]) }))));
      });
    }

    async cancel() {
      try { await post("/api/executions/" + encodeURIComponent(this.id) + "/cancel", { reason: "cancelled from the dashboard" }); }
      catch (e) { $("ex-progress").textContent = "cancel failed: " + e.message; }
    }
  }

  // -- the executions list ----------------------------------------------------------------
  class ExecutionsView {
    constructor() {
      this.offset = 0;
      this.limit = 50;
      this.items = new Map();
      this.listeners = [
        [$("exec-status"), "change", () => { this.offset = 0; this.load(); }],
        [$("exec-workflow"), "change", () => { this.offset = 0; this.load(); }],
        [$("exec-prev"), "click", () => { this.offset = Math.max(0, this.offset - this.limit); this.load(); }],
        [$("exec-next"), "click", () => { this.offset += this.limit; this.load(); }],
      ];
      this.listeners.forEach(([node, type, fn]) => node.addEventListener(type, fn));
      this.stream = null;
      this.closed = false;
      /* The stream starts from the id the first list reply was read at (last_event_id), so an
       * execution that ends between the two is not missed, whichever request the gateway serves first. */
      this.load().then((lastId) => {
        if (this.closed) return;
        const params = { types: "execution.started,execution.resumed,execution.completed,execution.failed," +
                                "execution.cancelled,progress.update" };
        if (lastId) params.last_event_id = lastId;
        this.stream = new Stream(params, (ev) => this.onEvent(ev));
      });
    }
    close() {
      this.closed = true;
      if (this.stream) this.stream.close();
      this.listeners.forEach(([node, type, fn]) => node.removeEventListener(type, fn));
    }
    async load() {
      const query = new URLSearchParams({ limit: this.limit, offset: this.offset });
      if ($("exec-status").value) query.set("status", $("exec-status").value);
      if ($("exec-workflow").value.trim()) query.set("workflow", $("exec-workflow").value.trim());
      let page;
      try { page = await api("/api/executions?" + query.toString()); } catch (e) { return null; }
      this.items = new Map(page.executions.map((item) => [item.execution_id, item]));
      this.total = page.total;
      this.render();
      return page.last_event_id;
    }
    onEvent(ev) {
      let item = this.items.get(ev.execution_id);
      if (!item) {
        if (this.offset !== 0 || ev.type !== "execution.started") return;
        item = { execution_id: ev.execution_id, workflow: ev.workflow, status: "running", started_at: ev.ts,
                 finished_at: null, progress: null };
        this.items = new Map([[item.execution_id, item], ...this.items]);
        this.total = (this.total || 0) + 1;
      }
      if (ev.type === "progress.update") item.progress = ev.meta;
      else if (TERMINAL.has(ev.type)) { item.status = ev.status; item.finished_at = ev.ts; }
      else item.status = "running";
      this.schedule();
    }
    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.render(); });
    }
    render() {
      const status = $("exec-status").value;
      const workflow = $("exec-workflow").value.trim();
      const body = $("exec-rows");
      clear(body);
      let shown = 0;
      this.items.forEach((item) => {
        if ((status && item.status !== status) || (workflow && item.workflow !== workflow)) return;
        shown++;
        const link = el("a", { href: "#/e/" + encodeURIComponent(item.execution_id), text: item.execution_id.slice(0, 12) });
        const st = el("span");
        badge(st, item.status);
        const p = item.progress;
        const duration = item.finished_at && item.started_at ? seconds(item.finished_at - item.started_at) : "";
        body.appendChild(el("tr", { "data-execution": item.execution_id, "data-status": item.status },
                            el("td", null, link), el("td", { text: item.workflow || "" }), el("td", null, st),
                            el("td", { text: p ? Math.round(p.percent) + "%" : "" }), el("td", { text: when(item.started_at) }),
                            el("td", { text: duration })));
      });
      show($("exec-empty"), shown === 0);
      $("exec-page").textContent = this.total ? (this.offset + 1) + "–" + Math.min(this.offset + this.limit, this.total) + " of " + this.total : "";
      $("exec-prev").disabled = this.offset === 0;
      $("exec-next").disabled = !this.total || this.offset + this.limit >= this.total;
    }
  }

  // -- workers ------------------------------------------------------------------------------
  class WorkersView {
    constructor() {
      this.stream = new Stream({ types: "worker.joined,worker.lost", since: "now" }, () => this.load());
      this.load();
    }
    close() { this.stream.close(); }
    async load() {
      let reply;
      try { reply = await api("/api/workers"); } catch (e) { return; }
      const body = $("worker-rows");
      clear(body);
      (reply.workers || []).forEach((w) => {
        const labels = Object.entries(w.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
        body.appendChild(el("tr", { "data-worker": w.worker_id }, el("td", { text: w.worker_id }), el("td", { text: w.host || "" }),
                            el("td", { text: String(w.pid || "") }), el("td", { text: labels }), el("td", { text: String(w.credits) }),
                            el("td", { text: String(w.in_hand) }), el("td", { text: String(w.completed) }),
                            el("td", { text: w.local ? "yes" : "no" })));
      });
      show($("workers-empty"), !(reply.workers || []).length);
    }
  }

  // -- routing --------------------------------------------------------------------------------
  function route() {
    if (current) current.close();
    current = null;
    const hash = location.hash || "#/";
    document.querySelectorAll(".view").forEach((v) => { v.hidden = true; });
    document.querySelectorAll("header nav a").forEach((a) => a.classList.remove("active"));
    const match = hash.match(/^#\/e\/(.+)$/);
    if (match) {
      show($("view-execution"), true);
      current = new ExecutionView(decodeURIComponent(match[1]));
    } else if (hash === "#/workers") {
      show($("view-workers"), true);
      $("nav-workers").classList.add("active");
      current = new WorkersView();
    } else {
      show($("view-executions"), true);
      $("nav-executions").classList.add("active");
      current = new ExecutionsView();
    }
  }

  /* Read-only access for the browser tests and for debugging from the console. */
  window.goflowDashboard = { view: () => current };
  window.addEventListener("hashchange", route);
  route();
})();
