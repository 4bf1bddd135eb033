"""`python -m tier_middleware`: the `tier-middleware` command."""

from .cli import main

raise SystemExit(main())
