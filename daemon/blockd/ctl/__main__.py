"""``python -m blockd.ctl`` is the ``blockctl`` command."""

from blockd.ctl.main import main

raise SystemExit(main())
