"""``python -m goflow.web EVENTS --control CONTROL --http HOST:PORT`` (what ``goflow dashboard`` runs)."""

import sys

from goflow.web.server import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m goflow.web"))
