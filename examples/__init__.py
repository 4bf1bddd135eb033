"""Runnable examples: Starlette, FastAPI and Django apps behind TierRoutingMiddleware."""
