"""The workflow language: schema, YAML loading with positions, validation and expressions.

Nothing here knows about processes, sockets or events; the coordinator and the workers
both build on it.
"""
