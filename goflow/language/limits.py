"""Limits on what a workflow file may be: each one a clear error naming the file and the limit.

They exist so that loading a submission costs bounded time and memory (a daemon loads files
that other people send), and are far above any real workflow: the largest measured
(docs/performance.md) are 100k nodes in about 7 MB.
"""

MAX_BYTES = 64 * 1024 * 1024
"""Size of a workflow file's text (UTF-8 bytes)."""
MAX_NODES = 250_000
"""Nodes in one workflow (loop bodies and parallel branches included)."""
MAX_DEPTH = 64
"""Nesting depth of YAML mappings and lists (a node's fields sit at depth 3)."""
MAX_ALIAS_VALUES = 1_000_000
"""Values that YAML aliases (``*name``) may add by repeating anchored values."""
