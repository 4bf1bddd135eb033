"""A minimal Django project (no database, no admin) behind TierRoutingMiddleware; see asgi.py."""
