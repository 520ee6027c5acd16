#!/usr/bin/env node
// A reliable goflow subscriber for one execution, written from docs/events.md alone.
//
//   node subscriber.js EVENTS_ENDPOINT CONTROL_ENDPOINT EXECUTION_ID [--rcvhwm N]
//
// Prints one JSON line per event of the execution, exactly once and in eseq order, from
// its first event to its terminal one (gaps repaired from the control socket's replay),
// then one line {"done": true, "count", "lost", "repaired", "last_type"} and exits 0
// (1 when events were lost for good).
"use strict";

const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

const TERMINAL = new Set(["execution.completed", "execution.failed", "execution.cancelled"]);
const CONTROL_TIMEOUT_MS = 10000;
// "Beyond every eseq", to learn the latest number only: an integer on the wire. A JS
// number above 2**53 is encoded as a msgpack float and refused, so use a safe integer.
const FAR = Number.MAX_SAFE_INTEGER;

function parseArgs(argv) {
  const [events, control, executionId, ...rest] = argv;
  if (!events || !control || !executionId) {
    console.error("usage: node subscriber.js EVENTS_ENDPOINT CONTROL_ENDPOINT EXECUTION_ID [--rcvhwm N]");
    process.exit(2);
  }
  const i = rest.indexOf("--rcvhwm");
  return { events, control, executionId, rcvhwm: i >= 0 ? Number(rest[i + 1]) : 1000 };
}

/** One request at a time over a DEALER: single-frame msgpack maps (docs/events.md §4). */
class Control {
  constructor(endpoint) {
    this.endpoint = endpoint;
    this.nextId = 1;
    this.open();
  }

  open() {
    this.socket = new zmq.Dealer({ linger: 0, receiveTimeout: CONTROL_TIMEOUT_MS });
    this.socket.connect(this.endpoint);
  }

  async request(op, fields) {
    const id = this.nextId++;
    await this.socket.send(encode({ op, id, ...fields }));
    for (;;) {
      let frames;
      try {
        frames = await this.socket.receive();
      } catch (err) {   // a timeout: after one, use a fresh socket (a late reply must not confuse us)
        this.socket.close();
        this.open();
        throw new Error(`control timeout (${op})`);
      }
      const reply = decode(frames[frames.length - 1]);
      if (reply.id !== id) continue;   // a reply to an older request
      if (!reply.ok) {
        const error = new Error(`${reply.error.type}: ${reply.error.message}`);
        error.type = reply.error.type;
        throw error;
      }
      return reply;
    }
  }

  close() {
    this.socket.close();
  }
}

async function main() {
  const { events, control: controlEndpoint, executionId, rcvhwm } = parseArgs(process.argv.slice(2));
  const control = new Control(controlEndpoint);
  const stats = { count: 0, lost: 0, repaired: 0 };
  let expected = 1;          // next eseq to deliver
  let epoch = null;
  let last = null;

  function deliver(event) {
    if (event.eseq !== expected) throw new Error(`internal: eseq ${event.eseq} delivered, ${expected} expected`);
    expected = event.eseq + 1;
    stats.count += 1;
    last = event;
    process.stdout.write(JSON.stringify({ eseq: event.eseq, seq: event.seq, type: event.type,
                                          node_id: event.node_id, attempt: event.attempt }) + "\n");
  }

  // Events [from, to] (to = null: up to the latest) from the replay log, paged.
  async function repair(from, to) {
    let cursor = from;
    for (;;) {
      const fields = { execution_id: executionId, from_eseq: cursor };
      if (to !== null) fields.to_eseq = to;
      let reply;
      try {
        reply = await control.request("replay", fields);
      } catch (err) {
        if (err.type === "not_found") return;   // not started yet: its first event will be eseq 1
        throw err;
      }
      epoch = epoch || reply.epoch;
      for (const payload of reply.events) {    // each a bin: the payload exactly as published
        const event = decode(payload);
        if (event.eseq < expected) continue;
        if (event.eseq > expected) {            // evicted from the log: lost for good
          stats.lost += event.eseq - expected;
          expected = event.eseq;
        }
        stats.repaired += 1;
        deliver(event);
        if (TERMINAL.has(event.type)) return;
      }
      if (reply.complete || reply.events.length === 0) return;
      cursor = reply.events.length ? decode(reply.events[reply.events.length - 1]).eseq + 1 : cursor;
    }
  }

  // 1. Subscribe first ("" = everything; filtered on arrival) and let messages queue.
  const sub = new zmq.Subscriber({ receiveHighWaterMark: rcvhwm, linger: 0 });
  sub.connect(events);
  sub.subscribe("");
  // 2. Replay what already happened.
  await repair(1, null);
  // 3. The live stream: drop duplicates, repair gaps, and a lost tail seen in heartbeats.
  if (!(last && TERMINAL.has(last.type))) {
    for await (const [topic, payload] of sub) {
      const event = decode(payload);
      if (epoch !== null && event.epoch !== epoch) {
        console.error(`coordinator restarted (epoch ${epoch} -> ${event.epoch}); stopping`);
        break;
      }
      epoch = event.epoch;
      if (event.type === "heartbeat") {
        const latest = (event.meta.executions || {})[executionId];
        if (latest !== undefined && latest >= expected) await repair(expected, latest);
      } else if (event.execution_id === executionId) {
        if (event.eseq < expected) continue;
        if (event.eseq > expected) await repair(expected, event.eseq - 1);
        if (last && TERMINAL.has(last.type)) break;
        if (event.eseq > expected) {            // what the replay could not return is lost
          stats.lost += event.eseq - expected;
          expected = event.eseq;
        }
        deliver(event);
      }
      if (last && TERMINAL.has(last.type)) break;
    }
  }
  sub.close();
  control.close();
  process.stdout.write(JSON.stringify({ done: true, ...stats, last_type: last && last.type }) + "\n");
  process.exitCode = stats.lost ? 1 : 0;
}

main().catch((err) => {
  console.error(`subscriber: ${err.message}`);
  process.exit(3);
});
