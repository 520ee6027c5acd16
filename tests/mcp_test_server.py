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
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio
from typing import Any
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("goflow-test-server")

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
