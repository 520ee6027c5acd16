"""Running the gateway: address and token policy, uvicorn, and the child process that
``goflow-coordinator --http`` and ``goflow run --http`` start.

The gateway always runs in a process of its own (``python -m goflow.web``), subscribed to
the coordinator like any other subscriber: it never shares the reactor's thread or
interpreter lock, so it costs the engine only the publishing it already does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from goflow.security import ExposureError, is_loopback_host
from goflow.security import check_exposure as security_check_exposure

log = logging.getLogger("goflow.web")

TOKEN_ENV = "GOFLOW_HTTP_TOKEN"
READY_PREFIX = "goflow dashboard: serving "
#: The gateway child of goflow-coordinator / goflow run runs at this lower CPU priority.
CHILD_NICENESS = 10


class AddressError(ValueError):
    """A bad ``--http`` address or a non-loopback one without a token."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> ``(host, port)``."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise AddressError(f"--http {text!r} must look like HOST:PORT, e.g. 127.0.0.1:8080")
    value = int(port)
    if not 0 <= value <= 65535:
        raise AddressError(f"--http {text!r}: port out of range")
    return host.strip("[]"), value


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token from ``--http-token``, ``--http-token-file`` or ``$GOFLOW_HTTP_TOKEN``."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AddressError(f"cannot read --http-token-file {token_file}: {exc.strerror}") from None
        if not token:
            raise AddressError(f"--http-token-file {token_file} is empty")
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 16:
        raise AddressError("the HTTP token must be at least 16 characters (e.g. `python -c 'import secrets; "
                           "print(secrets.token_urlsafe(32))'`)")
    return token


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token (the bind policy of every listener:
    :func:`goflow.security.check_exposure`)."""
    try:
        security_check_exposure(f"the dashboard on {host}", host, protected=bool(token),
                                remedy="give --http-token or --http-token-file (loopback addresses need none)")
    except ExposureError as exc:
        raise AddressError(str(exc)) from None


def allowed_hosts(host: str, port: int, token: str | None) -> tuple[str, ...]:
    """Host headers a loopback gateway accepts (DNS rebinding); any with a token."""
    if token:
        return ()
    names = {host, "localhost", "127.0.0.1", "[::1]"} if is_loopback_host(host) else {host}
    return tuple(f"{name}:{port}" for name in sorted(names)) + tuple(sorted(names))


# -- serving -----------------------------------------------------------------------------
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."


def _quiet_cut_off(record: logging.LogRecord) -> bool:
    """Drop uvicorn's error line for a response left incomplete: the one such response is the
    event stream of a stalled browser, which the gateway cuts off on purpose (counted in
    ``cut_off``), and every browser's cut-off would otherwise print an ERROR."""
    return record.getMessage() != INCOMPLETE_RESPONSE


def serve(config: Any, host: str, port: int, *, stop: threading.Event | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop``); prints the ready line with the bound URL."""
    import uvicorn

    from goflow.web.app import create_app

    app = create_app(config)
    logging.getLogger("uvicorn.error").addFilter(_quiet_cut_off)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                           access_log=False, timeout_graceful_shutdown=1,
                                           proxy_headers=False, server_header=False))

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        shown = f"[{host}]" if ":" in host else host
        print(f"{READY_PREFIX}http://{shown}:{bound}/", file=sys.stderr, flush=True)
        while not task.done():
            if stop is not None and stop.is_set():
                server.should_exit = True
            await asyncio.sleep(0.1)
        await task

    asyncio.run(main())
    return 0 if server.started else 2


def build_parser(prog: str = "goflow dashboard") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the live web dashboard of a goflow event stream.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("events", help="the coordinator's events endpoint, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--control", metavar="ENDPOINT", help="its control endpoint (replay, executions, ...)")
    parser.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="where to serve (default 127.0.0.1:8080; other than loopback needs a token)")
    add_token_arguments(parser)
    parser.add_argument("--db", metavar="PATH", help="a history database for executions no longer in memory")
    parser.add_argument("--allow-control", action="store_true",
                        help="serve POST submit and cancel (the gateway fronts a daemon)")
    parser.add_argument("--curve-server-key", metavar="FILE", help="the coordinator's public key (CURVE)")
    parser.add_argument("--curve-secret-key", metavar="FILE", help="this client's key pair (CURVE)")
    parser.add_argument("--buffer", type=int, default=None, metavar="EVENTS",
                        help="events the gateway holds for browsers that resume (default 100000)")
    parser.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                        help="a browser whose connection accepts nothing for SECONDS is cut off; it resumes "
                             "by its last event id (default 10)")
    parser.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-token", metavar="TOKEN", default=None,
                        help=f"require this token on every HTTP request (or ${TOKEN_ENV})")
    parser.add_argument("--http-token-file", metavar="FILE", default=None, help="read the token from FILE")


def main(argv: list[str] | None = None, prog: str = "goflow dashboard") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    from goflow.security import KeyFileError, client_curve_from
    from goflow.web.app import GatewayConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_address(args.http)
        token = read_token(args.http_token, args.http_token_file)
        check_exposure(host, token)
        curve = client_curve_from(args.curve_server_key, args.curve_secret_key)
    except (AddressError, KeyFileError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = GatewayConfig(events=args.events, control=args.control, curve=curve, token=token, db=args.db,
                           allow_control=args.allow_control, allowed_hosts=allowed_hosts(host, port, token),
                           capacity=args.buffer,
                           **({"stall_s": args.stall_timeout} if args.stall_timeout is not None else {}))
    stop = threading.Event()
    if args.exit_with_stdin:   # a child of goflow-coordinator / goflow run: end with the parent,
        try:                   # and yield the CPU to the engine it observes (an observer must not slow it)
            os.nice(CHILD_NICENESS)
        except OSError:
            pass

        def watch() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                stop.set()
        threading.Thread(target=watch, name="goflow-web-parent", daemon=True).start()
    try:
        return serve(config, host, port, stop=stop)
    except OSError as exc:
        print(f"error: cannot serve on {args.http}: {exc}", file=sys.stderr)
        return 2


class GatewayProcess:
    """The gateway as a child process (``goflow-coordinator --http``, ``goflow run --http``).

    The token travels in the environment, not the command line; the child exits when this
    process closes its stdin (or dies).
    """

    def __init__(self, http: str, events: str, control: str | None, *, token: str | None = None,
                 db: str | None = None, allow_control: bool = False, curve_secret_key: str | None = None,
                 stall_timeout: float | None = None, buffer: int | None = None):
        host, _ = parse_address(http)
        check_exposure(host, token)
        self.http = http
        command = [sys.executable, "-m", "goflow.web", events, "--http", http, "--exit-with-stdin"]
        if control:
            command += ["--control", control]
        if db:
            command += ["--db", db]
        if allow_control:
            command.append("--allow-control")
        if stall_timeout is not None:
            command += ["--stall-timeout", str(stall_timeout)]
        if buffer is not None:
            command += ["--buffer", str(buffer)]
        if curve_secret_key:   # the coordinator's own key pair, as its local workers use it
            command += ["--curve-server-key", curve_secret_key, "--curve-secret-key", curve_secret_key]
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if token:
            env[TOKEN_ENV] = token
        self.command = command
        self.env = env
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start and wait for the ready line; returns the URL. Raises RuntimeError if it fails."""
        self.process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                if line.startswith(READY_PREFIX) and self.url is None:
                    self.url = line[len(READY_PREFIX):].strip()
                    found.set()
                else:
                    lines.append(line)
                    sys.stderr.write(line)
            found.set()

        threading.Thread(target=read, name="goflow-web-stderr", daemon=True).start()
        found.wait(timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError("the dashboard did not start: " + ("".join(lines[-5:]).strip() or "no output"))
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except OSError:
            pass
