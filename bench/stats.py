"""Small statistics helpers shared by the benchmark scripts (stdlib only)."""

from __future__ import annotations

import statistics


def pct(values, q):
    """q-th percentile (0-100) by nearest rank on a sorted copy."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1)))))
    return s[k]


def summary(values):
    """median, min, max, n of a list of numbers (None-safe)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}
