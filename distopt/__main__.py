"""``python -m distopt ...`` is the ``distopt`` command line."""
from distopt.cli import main

raise SystemExit(main())
