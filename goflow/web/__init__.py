"""The live web dashboard: an HTTP gateway over the event stream and the page it serves.

- :mod:`goflow.web.hub`: one reliable subscriber feeding a ring that browsers read by cursor.
- :mod:`goflow.web.app`: the Starlette app (SSE ``/api/events``, JSON API, the page, the guard).
- :mod:`goflow.web.server`: address/token policy, uvicorn, the child process of the daemon.
- ``static/``: the page (no build step; vendored libraries under ``static/vendor/``).

The contract is in docs/web.md.
"""
