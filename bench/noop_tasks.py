"""The no-op task every benchmark runs (goflow workers and peers import it from bench/)."""


def noop(*args, **kwargs):
    return None


def print_lines(count: int):
    """Print ``count`` short lines (the node.log cost benchmark)."""
    for i in range(count):
        print(f"line {i} of a chatty node")
    return None
