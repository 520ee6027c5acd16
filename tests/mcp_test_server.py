"""A small MCP server used by goflow's MCP tests.

Run it with ``python tests/mcp_test_server.py`` (stdio) or
``python tests/mcp_test_server.py --http PORT`` (streamable HTTP on
127.0.0.1:PORT, path ``/mcp``) or ``--sse PORT`` (legacy SSE, path ``/sse``).

It is built on the official SDK's ``MCPServer`` (the class called ``FastMCP`` before
mcp 2.x). Every tool is deliberately tiny; each exercises one behaviour of the client:

* ``echo(message)``, ``add(a, b)`` (typed ints, so arguments must arrive as numbers)
* ``fail(message)`` raises, which the server reports as an ``isError`` result
* ``slow(seconds)`` sleeps, and records whether the client cancelled it
  (``cancelled_count()`` reads that record back)
* ``big(size)`` returns ``size`` characters of text (> 1 MiB in the tests)
* ``die()`` exits the process in the middle of the call
* ``structured()`` returns a dict (structured output)
* ``env_value(name)`` returns ``os.environ.get(name)``
* ``pid()`` returns the server's process id (to check session reuse)
* ``noisy(lines)`` writes lines to stderr (to check the client drains it)
* ``chatter(steps)`` sends ``notifications/message`` at several levels and
  ``notifications/progress`` for each step, then returns ``steps``
* ``headers_seen()`` returns the ``traceparent`` header of its HTTP request and the sha256 of
  its ``authorization`` header (so a test can check a token arrived without echoing it)
* ``wrong_schema()`` returns ``{"temperature": "hot"}`` while ``tools/list`` declares an
  ``outputSchema`` with a numeric ``temperature`` (a server at fault)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import anyio
from typing import Any
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

WRONG_SCHEMA = {"type": "object", "properties": {"temperature": {"type": "number"}}, "required": ["temperature"]}


class _Server(MCPServer):
    async def list_tools(self):  # serves a deliberately wrong outputSchema for one tool
        tools = await super().list_tools()
        return [t.model_copy(update={"output_schema": WRONG_SCHEMA}) if t.name == "wrong_schema" else t
                for t in tools]


server = _Server("goflow-test-server")

_CANCELLED: list[float] = []


@server.tool()
def echo(message: str) -> str:
    """Return the message unchanged."""
    return message


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    if not isinstance(a, int) or not isinstance(b, int):  # pragma: no cover - defensive
        raise TypeError(f"expected ints, got {type(a).__name__} and {type(b).__name__}")
    return a + b


@server.tool()
def fail(message: str) -> str:
    """Always fail with the given message."""
    raise ToolError(message)


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep for ``seconds``; a cancellation from the client is recorded."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _CANCELLED.append(seconds)
        print(f"slow({seconds}) cancelled by the client", file=sys.stderr, flush=True)
        raise
    return f"slept {seconds}"


@server.tool()
def cancelled_count() -> int:
    """How many ``slow`` calls the client has cancelled in this process."""
    return len(_CANCELLED)


@server.tool()
def big(size: int) -> str:
    """Return ``size`` characters of text."""
    chunk = "0123456789abcdef"
    return (chunk * (size // len(chunk) + 1))[:size]


@server.tool()
def die() -> str:
    """Exit the server process in the middle of the call."""
    print("die(): exiting now", file=sys.stderr, flush=True)
    os._exit(1)


@server.tool()
def structured() -> dict[str, Any]:
    """Return a dict (structured content)."""
    return {"name": "widget", "count": 3, "tags": ["a", "b"]}


@server.tool()
def env_value(name: str) -> str | None:
    """Return the value of an environment variable in the server process."""
    return os.environ.get(name)


@server.tool()
def pid() -> int:
    """Return the server's process id."""
    return os.getpid()


@server.tool()
def noisy(lines: int) -> int:
    """Write ``lines`` lines to stderr, then return the count."""
    for i in range(lines):
        print(f"noise line {i} " + "x" * 200, file=sys.stderr)
    sys.stderr.flush()
    return lines


@server.tool()
async def chatter(steps: int, ctx: Context) -> int:
    """Log at several levels and report progress for each step."""
    await ctx.debug("debug from the server")
    await ctx.info("info from the server", logger_name="chatter")
    await ctx.warning({"structured": "warning"})
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    await ctx.error("error from the server")
    return steps


@server.tool()
async def headers_seen(ctx: Context) -> dict[str, Any]:
    """The trace-context header of this HTTP request and a digest of its authorization header."""
    headers = ctx.headers or {}
    authorization = headers.get("authorization")
    return {"traceparent": headers.get("traceparent"),
            "authorization_sha256": hashlib.sha256(authorization.encode()).hexdigest() if authorization else None}


@server.tool()
def wrong_schema() -> dict[str, Any]:
    """Return a temperature that is not a number (the declared outputSchema says number)."""
    return {"temperature": "hot"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT/mcp")
    parser.add_argument("--sse", type=int, metavar="PORT", help="serve the legacy SSE transport on 127.0.0.1:PORT/sse")
    args = parser.parse_args(argv)
    if args.sse:
        server.run("sse", host="127.0.0.1", port=args.sse)
    elif args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
