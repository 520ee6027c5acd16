"""CURVE keys and client authentication for the coordinator's sockets (docs/security.md).

Key files use the ZeroMQ certificate format (``zmq.auth.create_certificates``):
``NAME.key`` holds the public key only and can be shared; ``NAME.key_secret`` holds both
keys and is written with mode 0600.

The coordinator is a CURVE *server* on all three sockets (workers, control, events). Which
clients may connect is decided by :class:`Authenticator`, a ZAP handler running on the
coordinator's ZeroMQ context: a client is admitted when its public key is in one of the
``*.key`` files of the authorized-keys directory. :meth:`Authenticator.reload` re-reads the
directory (the daemon calls it on SIGHUP). Refused clients are logged by public key (z85)
and peer address, never with secret material.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("goflow.security")

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
REFUSAL_LOG_INTERVAL = 60.0
"""A refused key is logged at most once per this many seconds (a misconfigured client retries fast)."""


class KeyFileError(ValueError):
    """A key file is missing, unreadable or not in the expected format."""


# -- the bind policy (every listener: ZeroMQ sockets, the dashboard, metrics) ------------------
class ExposureError(ValueError):
    """A listener would be reachable beyond this machine without authentication."""


def is_loopback_host(host: str | None) -> bool:
    """Whether a bind host stays on this machine (None: ipc:// or inproc://)."""
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "lo"  # an interface name: only the loopback interface counts


def check_exposure(listener: str, host: str | None, *, protected: bool, remedy: str) -> None:
    """The one bind policy: loopback is open; any other address needs ``protected`` (CURVE
    for ZeroMQ sockets, a token for HTTP, an explicit ``--insecure``), else ExposureError
    naming the listener and ``remedy``."""
    if not protected and not is_loopback_host(host):
        raise ExposureError(f"refusing to bind {listener} without authentication: {remedy}")


ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")
"""The ZeroMQ transports goflow binds and connects."""


def endpoint_host(endpoint: str) -> str | None:
    """The host part of a tcp:// endpoint (None for ipc://, inproc://); ValueError if malformed:
    another scheme, or a tcp:// port that is not a number (or ``*``, a bind's any port)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"endpoint {endpoint!r} must look like tcp://HOST:PORT")
    if scheme not in ENDPOINT_SCHEMES:
        raise ValueError(f"endpoint {endpoint!r}: unknown transport {scheme!r}; use tcp://HOST:PORT "
                         f"(or ipc://PATH on this host)")
    if scheme != "tcp":
        return None
    if ";" in rest:  # tcp://source;dest form: the bind address is the second part
        rest = rest.split(";", 1)[1]
    host, colon, port = rest.rpartition(":")
    if not colon:
        raise ValueError(f"endpoint {endpoint!r} has no port")
    if not (port == "*" or port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"endpoint {endpoint!r}: port {port!r} must be a number from 1 to 65535")
    return host.strip("[]")


def is_loopback_endpoint(endpoint: str) -> bool:
    return is_loopback_host(endpoint_host(endpoint))


def check_endpoint_exposure(endpoint: str, *, protected: bool, remedy: str) -> None:
    """:func:`check_exposure` for a ZeroMQ bind endpoint (``protected``: CURVE or ``--insecure``)."""
    check_exposure(endpoint, endpoint_host(endpoint), protected=protected, remedy=remedy)


def generate_keypair(directory: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600); return both paths.

    Refuses to overwrite existing files unless ``overwrite``.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    if not overwrite:
        for path in (public_file, secret_file):
            if path.exists():
                raise FileExistsError(f"{path} already exists (remove it first to replace the key pair)")
    previous = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        for path in (public_file, secret_file):
            if path.exists():
                path.unlink()
        public, secret = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(previous)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate file: {exc}") from None
    if not public or len(public) != 40:
        raise KeyFileError(f"{path}: no valid public-key entry")
    return public, secret


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` (z85 bytes) from a ``NAME.key_secret`` file.

    Warns (log) when the file is readable by group or others.
    """
    public, secret = _load(path)
    if not secret or len(secret) != 40:
        raise KeyFileError(f"{path}: no secret key in this file (is it the public NAME.key file?)")
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            log.warning("secret key file %s is readable by group/others (mode %o); chmod 600 it",
                        path, mode & 0o777)
    except OSError:
        pass
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    """The public key (z85 bytes) from a ``NAME.key`` (or ``NAME.key_secret``) file."""
    return _load(path)[0]


def client_curve(server_public_file: str | os.PathLike, secret_file: str | os.PathLike) -> dict[str, bytes]:
    """``{"server_public", "public", "secret"}`` for ControlClient, Monitor and Worker."""
    public, secret = load_secret(secret_file)
    return {"server_public": load_public(server_public_file), "public": public, "secret": secret}


def client_curve_from(server_public_file: str | None, secret_file: str | None) -> dict[str, bytes] | None:
    """Client CURVE options from key files, else from ``GOFLOW_CURVE_SERVER_KEY`` and
    ``GOFLOW_CURVE_SECRET_KEY``; None when neither is given. ValueError when only one is,
    or when a key file cannot be read."""
    server = server_public_file or os.environ.get("GOFLOW_CURVE_SERVER_KEY")
    secret = secret_file or os.environ.get("GOFLOW_CURVE_SECRET_KEY")
    if not server and not secret:
        return None
    if not (server and secret):
        raise ValueError("--curve-server-key and --curve-secret-key go together")
    return client_curve(server, secret)


def server_curve(secret_file: str | os.PathLike) -> dict[str, bytes]:
    """``{"public", "secret"}`` as ``Coordinator(curve=...)`` takes it."""
    public, secret = load_secret(secret_file)
    return {"public": public, "secret": secret}


ROLES = {"workers": "workers", "events": "subscribers", "control": "clients"}
"""ZAP domain of each coordinator socket -> the authorized-keys subdirectory for that role."""


def load_authorized_keys(directory: str | os.PathLike) -> dict[bytes, str]:
    """Every public key in ``DIR/*.key`` -> its file name. Bad files are logged and skipped."""
    keys: dict[bytes, str] = {}
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: authorized-keys directory does not exist")
    for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
        try:
            keys[load_public(path)] = path.name
        except KeyFileError as exc:
            log.warning("skipping authorized key file: %s", exc)
    return keys


class _Zap(ThreadAuthenticator):
    """pyzmq's threaded ZAP handler with our own CURVE decision (a key set swapped on reload)."""

    def __init__(self, context: zmq.Context, owner: "Authenticator"):
        super().__init__(context=context, log=logging.getLogger("goflow.security.zap"))
        self.owner = owner
        self._address = ""

    def _decide(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        key = z85.encode(client_key)
        if key in self.owner.allowed or key in self.owner.by_role.get(domain, ()):
            self.owner.stats["admitted"] += 1
            return True, b"OK"
        self.owner._refused(key, self._address, domain)
        return False, b"Unknown key"


# pyzmq >= 25 made the ZAP handlers coroutines; support both shapes.
if inspect.iscoroutinefunction(ThreadAuthenticator.handle_zap_message):
    async def _handle(self, msg):  # type: ignore[no-redef]
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await ThreadAuthenticator.handle_zap_message(self, msg)

    async def _curve(self, domain, client_key):  # type: ignore[no-redef]
        return self._decide(domain, client_key)
else:  # pragma: no cover - older pyzmq
    def _handle(self, msg):  # type: ignore[no-redef]
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        ThreadAuthenticator.handle_zap_message(self, msg)

    def _curve(self, domain, client_key):  # type: ignore[no-redef]
        return self._decide(domain, client_key)
_Zap.handle_zap_message = _handle  # type: ignore[method-assign]
_Zap._authenticate_curve = _curve  # type: ignore[method-assign]


class Authenticator:
    """CURVE client authentication on ``context``.

    Keys in ``authorized_keys_dir/*.key`` are admitted on every socket. Keys in a role
    subdirectory are admitted only on that role's socket (its ZAP domain): ``workers/`` on
    the workers endpoint, ``subscribers/`` on the events endpoint, ``clients/`` on the
    control endpoint, so a worker's or a dashboard's key cannot submit workflows.
    ``extra_keys``: public keys (z85 bytes) always admitted, e.g. the coordinator's own
    key for its local worker processes. Start it BEFORE binding the CURVE server sockets.
    """

    def __init__(self, context: zmq.Context, authorized_keys_dir: str | os.PathLike, *,
                 extra_keys: Iterable[bytes] = ()):
        self.context = context
        self.directory = Path(authorized_keys_dir)
        self.extra_keys = frozenset(extra_keys)
        self.allowed: frozenset[bytes] = frozenset()
        self.by_role: dict[str, frozenset[bytes]] = {}
        self.names: dict[bytes, str] = {}
        self.stats = {"admitted": 0, "refused": 0, "reloads": 0}
        self._last_logged: dict[tuple[bytes, str], float] = {}
        self._lock = threading.Lock()
        self._zap: _Zap | None = None
        self.reload()

    def start(self) -> "Authenticator":
        self._zap = _Zap(self.context, self)
        self._zap.start()
        return self

    def stop(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    def reload(self) -> int:
        """Re-read the authorized-keys directory; returns how many keys are admitted.

        On an unreadable directory the previous key set stays (and the error is logged).
        """
        try:
            everywhere = load_authorized_keys(self.directory)
            by_role = {domain: frozenset(load_authorized_keys(self.directory / sub))
                       for domain, sub in ROLES.items() if (self.directory / sub).is_dir()}
        except KeyFileError as exc:
            log.error("authorized keys not reloaded: %s", exc)
            return len(self.allowed)
        names = dict(everywhere)
        for domain, keys in by_role.items():
            for key in keys:
                names.setdefault(key, f"{ROLES[domain]}/")
        with self._lock:
            added = set(names) - set(self.names)
            removed = set(self.names) - set(names)
            self.names = names
            self.by_role = by_role
            self.allowed = frozenset(everywhere) | self.extra_keys  # one atomic swap; the ZAP thread reads it
            self.stats["reloads"] += 1
        log.info("authorized keys loaded: %d (added %d, removed %d) from %s", len(names), len(added),
                 len(removed), self.directory,
                 extra={"fields": {"keys": len(names), "added": sorted(k.decode() for k in added),
                                   "removed": sorted(k.decode() for k in removed)}})
        return len(self.allowed)

    def refusal_reason(self, key: bytes, domain: str) -> str:
        """Why ``key`` (z85) is not admitted on ``domain``'s socket, naming the directories."""
        role = ROLES.get(domain)
        wanted = f"{self.directory / role}/ or {self.directory}/" if role else f"{self.directory}/"
        holders = [f"{self.directory / ROLES[other]}/" for other, keys in sorted(self.by_role.items())
                   if key in keys and other != domain]
        if holders:
            return (f"it is in {', '.join(holders)}, which does not admit it on the {domain} socket; "
                    f"to admit it there, put it in {wanted}")
        return f"not in {wanted}"

    def _refused(self, key: bytes, address: str, domain: str = "") -> None:
        self.stats["refused"] += 1
        now = time.monotonic()
        if now - self._last_logged.get((key, domain), -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
            return
        if len(self._last_logged) > 10_000:
            self._last_logged.clear()
        self._last_logged[(key, domain)] = now
        log.warning("refused CURVE client key %s from %s on the %s socket (%s)", key.decode(), address or "?",
                    domain or "?", self.refusal_reason(key, domain),
                    extra={"fields": {"client_key": key.decode(), "address": address, "socket": domain}})

    def __enter__(self) -> "Authenticator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
