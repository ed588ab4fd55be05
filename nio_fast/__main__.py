"""``python -m nio_fast``: the ``nio-fast`` command line."""

from nio_fast.cli import main

raise SystemExit(main())
