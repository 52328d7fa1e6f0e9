"""Allow ``python -m nsdprep``."""

from nsdprep.cli import main

raise SystemExit(main())
