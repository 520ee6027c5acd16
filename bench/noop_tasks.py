"""The no-op task every benchmark runs (goflow workers and peers import it from bench/)."""


def noop(*args, **kwargs):
    return None
