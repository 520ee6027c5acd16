"""``python -m goflow.workers --connect ENDPOINT``: a local worker process."""

from goflow.workers.cli import main

raise SystemExit(main())
