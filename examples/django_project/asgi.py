"""Django example: the whole project behind TierRoutingMiddleware.

Run it from the repository root (tiers.toml is found next to the examples)::

    uvicorn examples.django_project.asgi:application

Django's ASGI handler does not speak the lifespan protocol; with uvicorn's default
`--lifespan auto` that only logs "ASGI 'lifespan' protocol appears unsupported." (pass
`--lifespan off` to silence it). The middleware hands lifespan events to Django unchanged.

Requests and the fail switch are the same as in the Starlette example; see views.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.asgi import get_asgi_application

from tier_middleware import TierRoutingMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")

CONFIG = Path(__file__).resolve().parent.parent / "tiers.toml"
ROUTES = ["/v1/chat/completions"]  # the paths whose requests are routed by tier

application = TierRoutingMiddleware(get_asgi_application(), config=CONFIG, routes=ROUTES)
