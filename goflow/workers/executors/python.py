"""``python`` nodes: call ``package.module:function`` with the node's args and kwargs."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import traceback
from typing import Any, Callable

from goflow.errors import ErrorKind
from goflow.workers.executors.base import TaskError


class PythonExecutor:
    """Imports each callable once per worker and calls it.

    Errors: ``import_error`` (module or attribute missing), ``python_error`` (the call
    raised; ``detail.exception`` holds the exception class name, which retry ``on`` lists
    may also name).
    """

    def __init__(self) -> None:
        self._callables: dict[str, Callable[..., Any]] = {}

    def _resolve(self, call: str) -> Callable[..., Any]:
        function = self._callables.get(call)
        if function is not None:
            return function
        module_name, _, attribute = call.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as exc:
            raise TaskError(ErrorKind.IMPORT_ERROR, f"cannot import module '{module_name}' for '{call}': "
                                            f"{type(exc).__name__}: {exc}") from None
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise TaskError(ErrorKind.IMPORT_ERROR, f"module '{module_name}' has no attribute '{attribute}' "
                                                f"(from '{call}')") from None
        if not callable(target):
            raise TaskError(ErrorKind.IMPORT_ERROR, f"'{call}' is not callable")
        self._callables[call] = target
        return target

    def __call__(self, spec: dict) -> Any:
        function = self._resolve(spec["call"])
        try:
            result = function(*spec.get("args", ()), **spec.get("kwargs", {}))
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
            return result
        except TaskError:
            raise
        except Exception as exc:
            frames = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8)
            raise TaskError(ErrorKind.PYTHON_ERROR, f"{type(exc).__name__}: {exc}",
                            detail={"exception": type(exc).__name__, "traceback": "".join(frames)[-4000:]}) from None


async def _await(awaitable: Any) -> Any:
    return await awaitable
