"""A problem found in a workflow file, located like a compiler diagnostic."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One error or warning, printed as ``FILE:LINE:COL: severity: message``."""

    file: str
    line: int
    column: int
    severity: Severity
    message: str
    node: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)
