"""``python -m goflow``: the goflow command line."""

from goflow.cli import main

raise SystemExit(main())
