"""Python callables used by examples/demo.yaml (any importable module works the same way)."""

from __future__ import annotations

import random
import time


def fetch_orders(count: int) -> dict:
    """Pretend to fetch orders from somewhere slow."""
    time.sleep(0.2)
    rng = random.Random(count)
    return {"orders": [{"id": i + 1, "sku": f"SKU-{i:03d}", "qty": rng.randint(1, 5),
                        "price": round(rng.uniform(5, 50), 2)} for i in range(count)]}


def score(order: dict) -> dict:
    """Score one order (a little CPU work per item)."""
    time.sleep(0.05)
    return {"id": order["id"], "score": round(order["qty"] * order["price"] / 10, 2)}


def check_inventory(skus: list) -> dict:
    time.sleep(0.3)
    return {"in_stock": len(skus), "checked": skus[:3]}


def price_lookup(skus: list) -> dict:
    time.sleep(0.25)
    return {"priced": len(skus)}
