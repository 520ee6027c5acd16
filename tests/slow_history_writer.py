"""The real history writer process (:mod:`goflow.history.writer`) with its SQLite connection
slowed down, for tests/test_history_durability.py's ``SlowStore``.

``python slow_history_writer.py GATE PAUSE PATH``: a progress handler, run by SQLite every
5,000 VM steps, waits until the file GATE exists, then sleeps PAUSE seconds.
"""

from __future__ import annotations

import os
import sys
import time

from goflow.history import writer


def main() -> int:
    gate, pause, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]

    def slow() -> int:
        while not os.path.exists(gate):
            time.sleep(0.005)
        if pause:
            time.sleep(pause)
        return 0

    return writer.main([path], on_connect=lambda conn: conn.set_progress_handler(slow, 5000))


if __name__ == "__main__":
    sys.exit(main())
