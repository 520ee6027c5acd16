"""MCP server specs and the user's server registry.

A *server spec* is a plain dict, the same shape as one entry of a workflow's
``servers:`` list (GoFlow's ``ServerConfig``)::

    {
      "id": "fs",                      # required, ^[A-Za-z][A-Za-z0-9_-]*$
      "name": "Filesystem",            # optional, display only
      "transport": "stdio",            # "stdio" (default) | "sse" | "http" (streamable HTTP)
      "command": "npx",                # stdio only, required there
      "args": ["-y", "@modelcontextprotocol/server-filesystem", "/data"],
      "env": {"TOKEN": "${env.MY_TOKEN}"},   # stdio: merged OVER the worker's environment
      "cwd": "/srv",                   # stdio only, optional
      "url": "https://host/mcp",       # sse/http only, required there (http:// or https://)
      "headers": {"Authorization": "Bearer ${env.API_TOKEN}"},  # sse/http only
      "credential_ref": "...",         # kept as given; not used at run time yet
    }

Unlike GoFlow, an omitted ``transport`` means ``stdio`` everywhere (validation *and*
connection), ``env`` is honoured and merged over the parent environment instead of
replacing it, and ``${env.NAME}`` references in ``env`` and ``headers`` values are
expanded from the connecting process's environment at connect time
(:func:`expand_env_refs`).

The registry (``goflow server add|list|remove``) is a YAML file ``servers.yaml`` in
:func:`config_dir`, written with mode 0600 because ``env``/``headers`` may hold tokens.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from goflow.errors import GoflowError

TRANSPORTS = ("stdio", "sse", "http")
SERVER_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
ENV_REF_RE = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")
REGISTRY_FILE = "servers.yaml"

# Keys a spec may carry. Unknown keys are reported by validate_spec.
SPEC_KEYS = ("id", "name", "command", "args", "transport", "env", "cwd", "url", "headers", "credential_ref")


class ServerSpecError(GoflowError):
    """A server spec that is invalid, or a registry operation that cannot be done."""


# --------------------------------------------------------------------------- specs


def transport_of(spec: Mapping[str, Any]) -> str:
    """The spec's transport; an omitted or empty ``transport`` means ``stdio``."""
    return (spec.get("transport") or "stdio").lower()


def validate_spec(spec: Mapping[str, Any]) -> list[str]:
    """Return every problem with ``spec`` as a readable message (empty list = valid)."""
    problems: list[str] = []
    if not isinstance(spec, Mapping):
        return [f"server spec must be a mapping, got {type(spec).__name__}"]
    sid = spec.get("id")
    label = f"server '{sid}'" if isinstance(sid, str) and sid else "server"
    if not sid:
        problems.append("server: 'id' is required")
    elif not isinstance(sid, str) or not SERVER_ID_RE.match(sid):
        problems.append(
            f"{label}: invalid id {sid!r}: it must start with a letter and contain only "
            "letters, digits, '_' and '-'"
        )
    for key in spec:
        if key not in SPEC_KEYS:
            problems.append(f"{label}: unknown key {key!r} (allowed: {', '.join(SPEC_KEYS)})")

    transport = transport_of(spec)
    if transport not in TRANSPORTS:
        problems.append(f"{label}: invalid transport {spec.get('transport')!r} (use stdio, sse or http)")
        return problems

    command = spec.get("command")
    args = spec.get("args")
    url = spec.get("url")
    if transport == "stdio":
        if not command or not isinstance(command, str):
            problems.append(f"{label}: transport stdio needs a 'command'")
        if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
            problems.append(f"{label}: 'args' must be a list of strings")
        if url:
            problems.append(f"{label}: 'url' is only used by the sse and http transports")
        if spec.get("headers"):
            problems.append(f"{label}: 'headers' are only used by the sse and http transports")
    else:
        if not url or not isinstance(url, str):
            problems.append(f"{label}: transport {transport} needs a 'url'")
        elif not (url.startswith("http://") or url.startswith("https://")):
            problems.append(f"{label}: 'url' must start with http:// or https:// (got {url!r})")
        if command:
            problems.append(f"{label}: 'command' is only used by the stdio transport")
        if args:
            problems.append(f"{label}: 'args' are only used by the stdio transport")
    for key in ("env", "headers"):
        value = spec.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in value.items()
        ):
            problems.append(f"{label}: '{key}' must be a mapping of names to strings")
    cwd = spec.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        problems.append(f"{label}: 'cwd' must be a string")
    return problems


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and return a clean copy: ``transport`` filled in, empty fields dropped.

    Raises :class:`ServerSpecError` listing every problem.
    """
    problems = validate_spec(spec)
    if problems:
        raise ServerSpecError("\n".join(problems))
    out: dict[str, Any] = {}
    for key in SPEC_KEYS:
        value = spec.get(key)
        if value in (None, "", [], {}):
            continue
        if key in ("env", "headers"):
            value = {str(k): str(v) for k, v in value.items()}
        out[key] = copy.deepcopy(value)
    out["transport"] = transport_of(spec)
    return out


def env_refs(value: str) -> list[str]:
    """The variable names referenced as ``${env.NAME}`` in ``value``."""
    return ENV_REF_RE.findall(value)


def expand_env_refs(
    values: Mapping[str, Any] | None,
    *,
    server_id: str = "?",
    field: str = "env",
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Expand ``${env.NAME}`` in every value of ``values`` from ``environ`` (default os.environ).

    A missing variable raises :class:`ServerSpecError` naming the variable and the key that
    uses it, never the value.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, raw in (values or {}).items():
        text = str(raw)

        def repl(match: re.Match[str], key: str = key) -> str:
            name = match.group(1)
            if name not in environ:
                raise ServerSpecError(
                    f"server '{server_id}': environment variable {name} is not set "
                    f"(referenced by {field} key {key!r} as ${{env.{name}}})"
                )
            return environ[name]

        out[str(key)] = ENV_REF_RE.sub(repl, text)
    return out


SECRET_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_secret_refs(spec: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with ``${NAME}`` in ``env`` and ``headers`` values replaced by the workflow's
    secret variable NAME (e.g. ``Authorization: Bearer ${api_token}``).

    Done by the coordinator when it sends the spec to a worker; the spec never enters events
    or history, and the values are masked wherever else they appear. Other ``${...}`` text
    (``${env.NAME}``, expanded by the worker) is left alone.
    """
    if not secrets:
        return dict(spec)
    out = dict(spec)
    for key in ("env", "headers"):
        values = spec.get(key)
        if values:
            out[key] = {name: SECRET_REF_RE.sub(
                lambda m: str(secrets[m.group(1)]) if m.group(1) in secrets else m.group(0), str(value))
                for name, value in values.items()}
    return out


def secret_values(*mappings: Mapping[str, str] | None, min_length: int = 4) -> list[str]:
    """Values that must never appear in logs or error messages (longest first)."""
    found = {v for m in mappings if m for v in m.values() if isinstance(v, str) and len(v) >= min_length}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def describe_spec(spec: Mapping[str, Any]) -> str:
    """One line saying where the server is (command line or URL), without env or headers."""
    if transport_of(spec) == "stdio":
        return " ".join([str(spec.get("command", ""))] + [str(a) for a in spec.get("args") or []]).strip()
    return str(spec.get("url", ""))


# ------------------------------------------------------------------------ registry


def config_dir() -> Path:
    """goflow's config directory.

    ``$GOFLOW_HOME`` if set, else ``$XDG_CONFIG_HOME/goflow``, else ``~/.config/goflow``.
    """
    home = os.environ.get("GOFLOW_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg).expanduser() / "goflow"
    return Path.home() / ".config" / "goflow"


def registry_path() -> Path:
    return config_dir() / REGISTRY_FILE


def load_registry() -> dict[str, dict[str, Any]]:
    """Return ``{id: spec}`` from ``servers.yaml`` (empty if the file does not exist).

    The file holds ``{"servers": [spec, ...]}``; a bare list or an ``{id: spec}`` map is
    accepted too.
    """
    path = registry_path()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ServerSpecError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if isinstance(data, Mapping) and "servers" in data:
        data = data["servers"]
    entries: list[Any]
    if isinstance(data, list):
        entries = data
    elif isinstance(data, Mapping):
        entries = [{"id": k, **(v or {})} for k, v in data.items()]
    else:
        raise ServerSpecError(f"{path}: expected a 'servers:' list")
    registry: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry.get("id"):
            raise ServerSpecError(f"{path}: every server needs an 'id'")
        registry[str(entry["id"])] = dict(entry)
    return registry


def save_registry(registry: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write the registry atomically, mode 0600 (the directory is created 0700)."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    servers = [dict(spec, id=sid) for sid, spec in sorted(registry.items())]
    text = yaml.safe_dump({"servers": servers}, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=".servers.", suffix=".yaml", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.chmod(path, 0o600)
    return path


def add_server(spec: Mapping[str, Any], *, replace: bool = False) -> dict[str, Any]:
    """Validate ``spec`` and store it; an existing id is an error unless ``replace``."""
    clean = normalize_spec(spec)
    registry = load_registry()
    if clean["id"] in registry and not replace:
        raise ServerSpecError(
            f"server '{clean['id']}' is already registered; remove it first (goflow server remove {clean['id']})"
        )
    registry[clean["id"]] = clean
    save_registry(registry)
    return clean


def remove_server(server_id: str) -> dict[str, Any]:
    """Remove and return the spec; an unknown id raises :class:`ServerSpecError`."""
    registry = load_registry()
    if server_id not in registry:
        known = ", ".join(sorted(registry)) or "none registered"
        raise ServerSpecError(f"no server '{server_id}' in {registry_path()} (known: {known})")
    spec = registry.pop(server_id)
    save_registry(registry)
    return spec


def get_server(server_id: str) -> dict[str, Any]:
    """The registered spec for ``server_id``; an unknown id raises :class:`ServerSpecError`."""
    registry = load_registry()
    if server_id not in registry:
        known = ", ".join(sorted(registry)) or "none registered"
        raise ServerSpecError(
            f"no server '{server_id}' in {registry_path()} (known: {known}); add it with: goflow server add"
        )
    return registry[server_id]
