"""``python -m blockd`` runs the daemon, like the ``blockd`` command."""

from blockd.cli import main

raise SystemExit(main())
