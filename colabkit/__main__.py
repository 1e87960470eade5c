"""``python -m colabkit``: the same commands as the ``colabkit`` console script."""

from colabkit.cli import main

raise SystemExit(main())
