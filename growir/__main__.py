"""``python -m growir``: the command line (see growir.cli)."""

from .cli import main

raise SystemExit(main())
