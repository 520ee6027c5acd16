"""The coordinator: the reactor, the worker broker, executions and scheduling, control ops,
recovery, and the two ways to compose them (embedded for ``goflow run``, the daemon)."""
