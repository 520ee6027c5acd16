"""Execution history: a SQLite projection of the event stream, its schema and its queries."""
