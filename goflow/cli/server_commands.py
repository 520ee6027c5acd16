"""``goflow server add|list|test|remove`` and ``goflow tools``.

Wire into the main parser with :func:`add_parsers`; every sub-parser sets
``func=handler`` where ``handler(args) -> int`` is the exit code (0 ok, 1 failure,
2 usage error).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from goflow.servers import (
    ServerSpecError,
    add_server,
    describe_spec,
    get_server,
    load_registry,
    registry_path,
    remove_server,
    transport_of,
)


def _kv_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServerSpecError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    if _is_tty():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for col in columns:
                table.add_column(col, overflow="fold")
            for row in rows:
                table.add_row(*row)
            Console().print(table)
            return
        except ImportError:  # pragma: no cover - rich is a dependency
            pass
    print("\t".join(columns))
    for row in rows:
        print("\t".join(cell.replace("\n", " ") for cell in row))


# ------------------------------------------------------------------- handlers


_ADD_VALUE_OPTS = {"--transport": "transport", "--url": "url", "--env": "env", "--header": "header",
                   "--name": "name", "--cwd": "cwd"}
_ADD_FLAG_OPTS = {"--replace": "replace"}


def _split_add_command_line(args: argparse.Namespace) -> None:
    """Split ``ID [OPTIONS] COMMAND [ARGS]...`` (argparse leaves it all in ``command_line``).

    Options may come before ID (argparse handles those) or between ID and COMMAND (handled
    here); everything from COMMAND on is passed to the server verbatim. ``--`` ends the
    options explicitly.
    """
    rest = list(args.command_line or [])
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            i += 1
            break
        if not tok.startswith("-"):
            break
        name, eq, inline = tok.partition("=")
        if name in _ADD_FLAG_OPTS and not eq:
            setattr(args, _ADD_FLAG_OPTS[name], True)
            i += 1
            continue
        if name not in _ADD_VALUE_OPTS:
            raise ServerSpecError(f"unknown option {tok!r}; put '--' before a COMMAND that starts with '-'")
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ServerSpecError(f"{name} needs a value")
            value = rest[i + 1]
            i += 2
        dest = _ADD_VALUE_OPTS[name]
        if dest in ("env", "header"):
            setattr(args, dest, (getattr(args, dest) or []) + [value])
        else:
            setattr(args, dest, value)
    args.server_command = rest[i] if i < len(rest) else None
    args.server_args = rest[i + 1:]
    if args.transport not in ("stdio", "sse", "http"):
        raise ServerSpecError(f"invalid --transport {args.transport!r} (use stdio, sse or http)")


def cmd_server_add(args: argparse.Namespace) -> int:
    try:
        _split_add_command_line(args)
    except ServerSpecError as exc:
        _err(str(exc))
        return 2
    transport = args.transport
    spec: dict[str, Any] = {"id": args.id, "transport": transport}
    try:
        if transport == "stdio":
            if args.url:
                raise ServerSpecError("--url is only for --transport sse or http")
            if not args.server_command:
                raise ServerSpecError("stdio servers need a COMMAND: goflow server add ID COMMAND [ARGS]...")
            spec["command"] = args.server_command
            spec["args"] = list(args.server_args or [])
            if args.header:
                raise ServerSpecError("--header is only for --transport sse or http")
        else:
            if args.server_command:
                raise ServerSpecError(
                    f"--transport {transport} takes no COMMAND; give the endpoint with --url"
                )
            if not args.url:
                raise ServerSpecError(f"--transport {transport} needs --url URL")
            spec["url"] = args.url
            spec["headers"] = _kv_pairs(args.header, "--header")
        spec["env"] = _kv_pairs(args.env, "--env")
        if args.name:
            spec["name"] = args.name
        if getattr(args, "cwd", None):
            spec["cwd"] = args.cwd
        clean = add_server(spec, replace=args.replace)
    except ServerSpecError as exc:
        _err(str(exc))
        return 1
    print(f"added server '{clean['id']}' ({clean['transport']}: {describe_spec(clean)}) to {registry_path()}")
    return 0


def cmd_server_list(args: argparse.Namespace) -> int:
    try:
        registry = load_registry()
    except ServerSpecError as exc:
        _err(str(exc))
        return 1
    if args.json:
        # env and header values may be secrets: list their names only
        out = []
        for sid, spec in sorted(registry.items()):
            entry = {k: v for k, v in spec.items() if k not in ("env", "headers")}
            entry["transport"] = transport_of(spec)
            entry["env"] = sorted((spec.get("env") or {}).keys())
            entry["headers"] = sorted((spec.get("headers") or {}).keys())
            out.append(entry)
        print(json.dumps(out, indent=2))
        return 0
    if not registry:
        print(f"no servers registered (file: {registry_path()}); add one with: goflow server add ID COMMAND [ARGS]...")
        return 0
    rows = [
        [
            sid,
            transport_of(spec),
            describe_spec(spec),
            ", ".join(sorted((spec.get("env") or {}).keys())),
        ]
        for sid, spec in sorted(registry.items())
    ]
    _print_table(f"MCP servers ({registry_path()})", ["ID", "TRANSPORT", "COMMAND / URL", "ENV"], rows)
    return 0


def _list_tools_for(server_id: str, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from goflow.workers.executors.mcp import MCPSessionPool

    spec = get_server(server_id)
    pool = MCPSessionPool(connect_timeout=timeout)
    try:
        tools = pool.list_tools(spec, timeout=timeout)
    finally:
        pool.close()
    return spec, tools


def _schema_summary(schema: dict[str, Any]) -> str:
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    parts = []
    for name, prop in props.items():
        typ = prop.get("type") if isinstance(prop, dict) else None
        if isinstance(typ, list):
            typ = "|".join(str(t) for t in typ)
        if typ is None and isinstance(prop, dict) and "anyOf" in prop:
            typ = "|".join(str(p.get("type", "?")) for p in prop["anyOf"] if isinstance(p, dict))
        parts.append(f"{name}{'' if name in required else '?'}: {typ or 'any'}")
    return ", ".join(parts)


def _print_tools(server_id: str, tools: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(tools, indent=2))
        return
    if _is_tty():
        rows = [[t["name"], _schema_summary(t.get("input_schema") or {}), (t.get("description") or "").strip()]
                for t in tools]
        _print_table(f"Tools of '{server_id}'", ["TOOL", "ARGUMENTS", "DESCRIPTION"], rows)
        return
    for t in tools:
        desc = (t.get("description") or "").strip().splitlines()
        print(f"{t['name']}({_schema_summary(t.get('input_schema') or {})})")
        if desc:
            print(f"    {desc[0]}")
        print("    input schema: " + json.dumps(t.get("input_schema") or {}, sort_keys=True))


def _tools_handler(args: argparse.Namespace, *, header: bool) -> int:
    from goflow.workers.executors.mcp import MCPToolError

    try:
        spec, tools = _list_tools_for(args.id, args.timeout)
    except ServerSpecError as exc:
        _err(str(exc))
        return 1
    except MCPToolError as exc:
        _err(f"server '{args.id}' failed ({exc.error_type}): {exc}")
        return 1
    if header and not args.json:
        print(f"server '{args.id}' OK ({transport_of(spec)}: {describe_spec(spec)}): {len(tools)} tool(s)")
    _print_tools(args.id, tools, args.json)
    return 0


def cmd_server_test(args: argparse.Namespace) -> int:
    return _tools_handler(args, header=True)


def cmd_tools(args: argparse.Namespace) -> int:
    return _tools_handler(args, header=False)


def cmd_server_remove(args: argparse.Namespace) -> int:
    try:
        remove_server(args.id)
    except ServerSpecError as exc:
        _err(str(exc))
        return 1
    print(f"removed server '{args.id}'")
    return 0


# -------------------------------------------------------------------- parsers


def add_parsers(subparsers: Any) -> None:
    """Register ``server`` (with add/list/test/remove) and ``tools`` on ``subparsers``."""
    server = subparsers.add_parser("server", help="manage the registered MCP servers",
                                   description="Manage the MCP servers registered in servers.yaml.")
    server_sub = server.add_subparsers(dest="server_command_name", metavar="{add,list,test,remove}")
    server_sub.required = True

    def _server_help(_: argparse.Namespace) -> int:
        server.print_help()
        return 2

    server.set_defaults(func=_server_help)

    add = server_sub.add_parser(
        "add",
        help="register a server",
        description="Register an MCP server. stdio: goflow server add ID COMMAND [ARGS]... ; "
        "sse/http: goflow server add ID --transport http --url URL. Put options before COMMAND, "
        "or use -- to separate server arguments that start with '-'.",
    )
    add.add_argument("id", metavar="ID")
    add.add_argument("command_line", metavar="COMMAND [ARGS]", nargs=argparse.REMAINDER,
                     help="the stdio server's command line (omit for sse/http)")
    add.add_argument("--transport", choices=("stdio", "sse", "http"), default="stdio")
    add.add_argument("--url", help="endpoint for sse/http servers")
    add.add_argument("--env", action="append", metavar="K=V", help="environment for stdio servers (repeatable); "
                     "values may use ${env.NAME}")
    add.add_argument("--header", action="append", metavar="K=V", help="HTTP header for sse/http (repeatable); "
                     "values may use ${env.NAME}")
    add.add_argument("--name", help="display name")
    add.add_argument("--cwd", help="working directory for a stdio server")
    add.add_argument("--replace", action="store_true", help="overwrite an existing server with the same ID")
    add.set_defaults(func=cmd_server_add)

    lst = server_sub.add_parser("list", help="list registered servers")
    lst.add_argument("--json", action="store_true", help="machine-readable output (env/header names only)")
    lst.set_defaults(func=cmd_server_list)

    test = server_sub.add_parser("test", help="connect to a server and list its tools")
    test.add_argument("id", metavar="ID")
    test.add_argument("--json", action="store_true")
    test.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    test.set_defaults(func=cmd_server_test)

    rm = server_sub.add_parser("remove", help="unregister a server")
    rm.add_argument("id", metavar="ID")
    rm.set_defaults(func=cmd_server_remove)

    tools = subparsers.add_parser("tools", help="list the tools of a registered MCP server")
    tools.add_argument("id", metavar="SERVER_ID")
    tools.add_argument("--json", action="store_true")
    tools.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    tools.set_defaults(func=cmd_tools)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m goflow.cli.server_commands``) for testing."""
    parser = argparse.ArgumentParser(prog="goflow")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
