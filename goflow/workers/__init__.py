"""The worker side of goflow (installed as ``goflow.workers``): runtime and node executors."""
