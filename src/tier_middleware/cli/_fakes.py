"""The demo's stand-ins: fake providers, a simulated clock, a health tracker that keeps a
timeline, and seeded traffic."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .._asgi import send_json
from .._health import HealthConfig, HealthTracker
from .._types import Receive, Scope, Send

_encode = msgspec.json.encode

PATH = "/v1/chat/completions"

# What callers ask for: mostly simple. Prompt words and max_tokens grow with the tier.
TIER_MIX = {"simple": 0.62, "moderate": 0.28, "complex": 0.10}
PROMPT_WORDS = {"simple": (60, 400), "moderate": (400, 1600), "complex": (1200, 4000)}
MAX_TOKENS = {"simple": 256, "moderate": 1024, "complex": 2048}
ONE_OFF = 0.15  # share of requests outside any conversation (no session id)
UPGRADE = 0.1  # chance that a conversation's next turn needs the next tier up
OPEN_CONVERSATIONS = 12


# -- fake providers --------------------------------------------------------------------------------


class FakeProviders:
    """Every provider's chat endpoint in one ASGI app; a provider in `down` answers 503."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.counter = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = dict(scope["headers"])
        provider = headers.get(b"x-tier-provider", b"").decode("latin-1")
        if scope["path"] != PATH:
            await send_json(
                send, 404, _encode({"error": {"message": "not found", "code": "not_found"}})
            )
            return
        if provider in self.down:
            error = {
                "message": f"{provider} is overloaded, try again later",
                "type": "server_error",
                "param": None,
                "code": "overloaded",
            }
            await send_json(send, 503, _encode({"error": error}))
            return
        request = msgspec.json.decode(body)
        model = str(request.get("model", "unknown"))
        prompt_tokens = sum(
            len(str(m.get("content", "")).split()) for m in request.get("messages", [])
        )
        limit = int(request.get("max_tokens", 512))
        completion_tokens = limit // 4 + prompt_tokens % (limit // 2)
        self.counter += 1
        completion = {
            "id": f"chatcmpl-demo-{self.counter:05d}",
            "object": "chat.completion",
            "created": 1_700_000_000 + self.counter,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"({model} answers)"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        await send_json(send, 200, _encode(completion))


# -- simulated time and health events --------------------------------------------------------------


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: Literal["down", "up", "backoff", "recovered"]
    provider: str
    model: str = ""
    seconds: float = 0.0  # the backoff started, or how long the model was out
    failures: int = 0


class RecordingTracker(HealthTracker):
    """A HealthTracker that also keeps a timeline of backoffs and recoveries.

    It only observes what the tracker decided: arguments it does not read pass through as they
    came, so the signature stays HealthTracker's alone."""

    def __init__(self, config: HealthConfig, clock: SimClock, rng: random.Random) -> None:
        super().__init__(config, clock=clock, rng=rng)
        self.events: list[Event] = []
        self._out_since: dict[tuple[str, str], float] = {}

    def record_failure(self, provider: str, model: str, *args: Any, **kwargs: Any) -> float | None:
        backoff = super().record_failure(provider, model, *args, **kwargs)
        if backoff is not None:
            now = self.clock()
            self._out_since.setdefault((provider, model), now)
            failures = self.status(provider, model).consecutive_failures
            self.events.append(Event(now, "backoff", provider, model, backoff, failures))
        return backoff

    def record_success(self, provider: str, model: str) -> None:
        since = self._out_since.pop((provider, model), None)
        super().record_success(provider, model)
        if since is not None:
            now = self.clock()
            self.events.append(Event(now, "recovered", provider, model, now - since))


# -- traffic ---------------------------------------------------------------------------------------


@dataclass
class Conversation:
    session: str
    tier: str
    turns: int


@dataclass(frozen=True, slots=True)
class Call:
    tier: str
    session: str | None
    words: int


class Traffic:
    """Seeded requests: one-off calls and multi-turn conversations that sometimes move up a tier."""

    def __init__(self, rng: random.Random, tiers: tuple[str, ...]) -> None:
        self.rng = rng
        self.tiers = tiers
        self.open: list[Conversation] = []
        self.started = 0

    def _tier(self) -> str:
        return self.rng.choices(self.tiers, weights=[TIER_MIX[t] for t in self.tiers])[0]

    def _words(self, tier: str) -> int:
        low, high = PROMPT_WORDS[tier]
        return self.rng.randint(low, high)

    def next(self) -> Call:
        rng = self.rng
        if rng.random() < ONE_OFF:
            tier = self._tier()
            return Call(tier, None, self._words(tier))
        if len(self.open) < OPEN_CONVERSATIONS or rng.random() < 0.2:
            self.started += 1
            conversation = Conversation(f"conv-{self.started:04d}", self._tier(), rng.randint(2, 8))
            self.open.append(conversation)
        else:
            conversation = rng.choice(self.open)
        call = Call(conversation.tier, conversation.session, self._words(conversation.tier))
        conversation.turns -= 1
        if conversation.turns <= 0:
            self.open.remove(conversation)
        elif rng.random() < UPGRADE:
            rank = self.tiers.index(conversation.tier)
            conversation.tier = self.tiers[min(rank + 1, len(self.tiers) - 1)]
        return call


__all__ = [
    "MAX_TOKENS",
    "PATH",
    "Call",
    "Event",
    "FakeProviders",
    "RecordingTracker",
    "SimClock",
    "Traffic",
]
