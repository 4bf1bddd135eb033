"""`tier-middleware demo`: simulated chat traffic through the middleware, offline and in memory.

Fake providers (one raw ASGI app) answer OpenAI-style completions with a usage block, behind a
`TierRoutingMiddleware` with a built-in three-tier config, its own Prometheus registry, a seeded
rng and a simulated clock for health. Requests go through `httpx.ASGITransport`, one every
`STEP` simulated seconds. One provider answers 503 during the middle third of the run; backoff
and half-open probes play out on the simulated clock, so it comes back without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import httpx
import msgspec
from prometheus_client import CollectorRegistry

from .._config import TierConfig
from .._health import HealthConfig, HealthTracker
from .._middleware import TierRoutingMiddleware
from .._routes import RoutePolicy
from .._types import Message, Receive, Scope, Send
from ._tables import format_table

STEP = 0.5  # simulated seconds between two requests
DOWN = "anthropic"  # the provider that fails during the middle third
PATH = "/v1/chat/completions"
NAMESPACE = "llm"
PHASES = ("before", "outage", "after")

# Prices are USD per million tokens, for illustration only.
DEMO_CONFIG: dict[str, Any] = {
    "version": "demo-1",
    "tier_order": ["simple", "moderate", "complex"],
    "tiers": {
        "simple": [
            {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "relative_cost": 1,
                "input_price_per_million": 0.15,
                "output_price_per_million": 0.60,
            },
            {
                "provider": "google",
                "model": "gemini-2.0-flash",
                "relative_cost": 1,
                "input_price_per_million": 0.10,
                "output_price_per_million": 0.40,
            },
            {
                "provider": "anthropic",
                "model": "claude-3-5-haiku",
                "relative_cost": 2,
                "input_price_per_million": 0.80,
                "output_price_per_million": 4.00,
            },
        ],
        "moderate": [
            {
                "provider": "openai",
                "model": "gpt-4.1",
                "relative_cost": 5,
                "input_price_per_million": 2.00,
                "output_price_per_million": 8.00,
            },
            {
                "provider": "google",
                "model": "gemini-2.5-flash",
                "relative_cost": 2,
                "input_price_per_million": 0.30,
                "output_price_per_million": 2.50,
            },
            {
                "provider": "anthropic",
                "model": "claude-sonnet-4",
                "relative_cost": 4,
                "input_price_per_million": 3.00,
                "output_price_per_million": 15.00,
            },
        ],
        "complex": [
            {
                "provider": "openai",
                "model": "o3",
                "relative_cost": 8,
                "input_price_per_million": 2.00,
                "output_price_per_million": 8.00,
            },
            {
                "provider": "google",
                "model": "gemini-2.5-pro",
                "relative_cost": 6,
                "input_price_per_million": 1.25,
                "output_price_per_million": 10.00,
            },
            {
                "provider": "anthropic",
                "model": "claude-opus-4",
                "relative_cost": 20,
                "input_price_per_million": 15.00,
                "output_price_per_million": 75.00,
            },
        ],
    },
}

# Backoffs of 5, 10, 20, then 30 s (the cap): a 50 s outage is probed a few times, and a model
# is let back in by its first probe after the provider returns.
DEMO_HEALTH = HealthConfig(initial_backoff=5.0, max_backoff=30.0, multiplier=2.0)

# What callers ask for: mostly simple. Prompt words and max_tokens grow with the tier.
TIER_MIX = {"simple": 0.62, "moderate": 0.28, "complex": 0.10}
PROMPT_WORDS = {"simple": (60, 400), "moderate": (400, 1600), "complex": (1200, 4000)}
MAX_TOKENS = {"simple": 256, "moderate": 1024, "complex": 2048}
ONE_OFF = 0.15  # share of requests outside any conversation (no session id)
UPGRADE = 0.1  # chance that a conversation's next turn needs the next tier up
OPEN_CONVERSATIONS = 12
SHOW_BACKOFFS = 3  # per model in the timeline, besides the last one


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
            await _respond(send, 404, {"error": {"message": "not found", "code": "not_found"}})
            return
        if provider in self.down:
            error = {
                "message": f"{provider} is overloaded, try again later",
                "type": "server_error",
                "param": None,
                "code": "overloaded",
            }
            await _respond(send, 503, {"error": error})
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
        await _respond(send, 200, completion)


async def _respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = msgspec.json.encode(payload)
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


# -- simulated time and health events ----------------------------------------------------------


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
    """A HealthTracker that also keeps a timeline of backoffs and recoveries."""

    def __init__(self, config: HealthConfig, clock: SimClock, rng: random.Random) -> None:
        super().__init__(config, clock=clock, rng=rng)
        self.events: list[Event] = []
        self._out_since: dict[tuple[str, str], float] = {}

    def record_failure(
        self,
        provider: str,
        model: str,
        retry_after: float | None = None,
        *,
        started: float | None = None,
    ) -> float | None:
        backoff = super().record_failure(provider, model, retry_after, started=started)
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


# -- traffic -------------------------------------------------------------------------------------


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


# -- the run ---------------------------------------------------------------------------------------

ModelKey = tuple[str, str, str]  # tier, provider, model


@dataclass
class Report:
    seed: int
    requests: int
    config: TierConfig
    down_at: float
    up_at: float
    registry: CollectorRegistry
    events: list[Event]
    phase_picks: dict[str, dict[ModelKey, float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    retried: int = 0
    conversations: int = 0


def _selections(registry: CollectorRegistry, config: TierConfig) -> dict[ModelKey, float]:
    out: dict[ModelKey, float] = {}
    for tier in config.tier_order:
        for m in config.models(tier):
            labels = {"tier": tier, "provider": m.provider, "model": m.model}
            value = registry.get_sample_value(f"{NAMESPACE}_model_selections_total", labels)
            out[(tier, m.provider, m.model)] = value or 0.0
    return out


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The middleware logs every backoff as a warning; the demo shows them in its timeline."""
    log = logging.getLogger("tier_middleware")
    handler = logging.NullHandler()
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


async def simulate(seed: int, requests: int, out: TextIO | None = None) -> Report:
    """Send `requests` requests through the middleware; `out` gets a progress line if given."""
    config = TierConfig.load(DEMO_CONFIG)
    clock = SimClock()
    registry = CollectorRegistry()
    tracker = RecordingTracker(DEMO_HEALTH, clock, random.Random(f"{seed}:health"))
    providers = FakeProviders()
    middleware = TierRoutingMiddleware(
        providers,
        config=config,
        routes={PATH: RoutePolicy(require_tier=True)},
        health=tracker,
        registry=registry,
        metrics_namespace=NAMESPACE,
        rng=random.Random(f"{seed}:routing"),
        name="demo",
    )
    traffic = Traffic(random.Random(f"{seed}:traffic"), config.tier_order)
    down_index, up_index = requests // 3, 2 * requests // 3
    report = Report(
        seed, requests, config, down_index * STEP, up_index * STEP, registry, tracker.events
    )
    phases = iter(PHASES)
    phase = next(phases)
    before = _selections(registry, config)

    def close_phase() -> str:
        nonlocal before
        now = _selections(registry, config)
        report.phase_picks[phase] = {k: now[k] - before[k] for k in now}
        before = now
        return next(phases, phase)

    shown = 0  # the width of the progress line on screen
    transport = httpx.ASGITransport(app=middleware)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            for i in range(requests):
                if i == down_index:
                    phase = close_phase()
                    providers.down.add(DOWN)
                    tracker.events.append(Event(clock(), "down", DOWN))
                if i == up_index:
                    phase = close_phase()
                    providers.down.discard(DOWN)
                    tracker.events.append(Event(clock(), "up", DOWN))
                call = traffic.next()
                headers = {"x-session-id": call.session} if call.session else {}
                body = {
                    "tier": call.tier,
                    "max_tokens": MAX_TOKENS[call.tier],
                    "messages": [{"role": "user", "content": " ".join(["word"] * call.words)}],
                }
                response = await client.post(PATH, json=body, headers=headers)
                status = response.status_code
                report.statuses[status] = report.statuses.get(status, 0) + 1
                if int(response.headers.get("x-tier-attempts", "0")) > 1:
                    report.retried += 1
                if out is not None and (i % 10 == 9 or i == requests - 1):
                    state = f"{DOWN} down" if DOWN in providers.down else "all providers up"
                    line = f"  request {i + 1:>{len(str(requests))}}/{requests}  "
                    line += f"t={clock():.1f}s  {state}"
                    out.write("\r" + line.ljust(shown))
                    out.flush()
                    shown = len(line)
                clock.now += STEP
    finally:
        await middleware.aclose()
    if out is not None and shown:
        out.write("\r" + " " * shown + "\r")
        out.flush()
    close_phase()  # every phase has begun: down_index < up_index < requests, or all are 0
    report.conversations = traffic.started
    return report


# -- the summary -----------------------------------------------------------------------------------


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return registry.get_sample_value(f"{NAMESPACE}_{name}", labels) or 0.0


def _samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    wanted = f"{NAMESPACE}_{name}"
    return [
        (dict(sample.labels), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == wanted
    ]


def _series(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _usd(value: float) -> str:
    return f"{value:.4f}"


def _count(value: float) -> str:
    return str(round(value))


def render(report: Report) -> list[str]:
    """The summary: requests per tier, selections per model and phase, the health timeline."""
    config = report.config
    registry = report.registry
    tiers = config.tier_order
    models = [m for tier in tiers for m in config.models(tier)]
    providers = list(dict.fromkeys(m.provider for m in models))
    retries_by_tier: dict[str, float] = dict.fromkeys(tiers, 0.0)
    for labels, value in _samples(registry, "model_retries_total"):
        retries_by_tier[labels["tier"]] = retries_by_tier.get(labels["tier"], 0.0) + value

    def cost(tier: str, provider: str, model: str) -> float:
        labels = {"tier": tier, "provider": provider, "model": model}
        return _value(registry, "cost_usd_total", labels)

    lines = [
        f"tier-middleware demo: {report.requests} requests (seed {report.seed}), "
        f"one every {STEP:g} s of simulated time",
        f"{len(tiers)} tiers, {len(models)} models from {_series(providers)}",
        f"{DOWN} is down from t={report.down_at:.1f}s to t={report.up_at:.1f}s",
        "",
        "Requests by tier",
    ]
    rows: list[list[str]] = []
    totals = [0.0, 0.0, 0.0, 0.0]
    for tier in tiers:
        row = [
            _value(registry, "tier_requests_total", {"tier": tier}),
            retries_by_tier[tier],
            _value(registry, "tier_unavailable_total", {"tier": tier}),
            sum(cost(tier, m.provider, m.model) for m in config.models(tier)),
        ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        rows.append([tier, *map(_count, row[:3]), _usd(row[3])])
    rows.append(["total", *map(_count, totals[:3]), _usd(totals[3])])
    lines += format_table(["tier", "requests", "retries", "503s", "cost USD"], rows)

    lines += ["", f"Model selections (retries included; phases around the {DOWN} outage)"]
    rows = []
    for tier in tiers:
        keys = [(tier, m.provider, m.model) for m in config.models(tier)]
        picks = {k: sum(report.phase_picks[p][k] for p in PHASES) for k in keys}
        total = sum(picks.values())
        rows.append([tier, *[""] * (len(PHASES) + 3)])
        for k in keys:
            rows.append(
                [
                    f"  {k[1]}/{k[2]}",
                    _count(picks[k]),
                    f"{picks[k] / total * 100:.1f}%" if total else "-",
                    *(_count(report.phase_picks[p][k]) for p in PHASES),
                    _usd(cost(*k)),
                ]
            )
    lines += format_table(["tier / model", "picks", "share", *PHASES, "cost USD"], rows)

    lines += ["", "Health timeline (simulated seconds)"]
    width = max([len(f"{e.provider}/{e.model}") for e in report.events if e.model] or [0])
    # A long outage fails many probes: each model shows its first few and its last backoff.
    backoffs: dict[str, list[Event]] = {}
    for event in report.events:
        if event.kind == "backoff":
            backoffs.setdefault(f"{event.provider}/{event.model}", []).append(event)
    hidden = {id(e) for shown in backoffs.values() for e in shown[SHOW_BACKOFFS:-1]}
    for event in report.events:
        if id(event) in hidden:
            continue
        at = f"  {event.at:6.1f}s  "
        name = f"{event.provider}/{event.model}".ljust(width)
        if event.kind == "down":
            lines.append(f"{at}{event.provider} goes down: its models answer 503")
        elif event.kind == "up":
            lines.append(f"{at}{event.provider} is back up: half-open probes will find out")
        elif event.kind == "backoff":
            what = "failed" if event.failures == 1 else "probe failed"
            text = f"{at}{name}  {what}, backed off {event.seconds:g} s"
            if event.failures > SHOW_BACKOFFS + 1:
                text += f" ({event.failures} failures)"
            lines.append(text)
        else:
            lines.append(f"{at}{name}  probe ok, back in rotation after {event.seconds:.1f} s")
    if not any(e.kind in ("backoff", "recovered") for e in report.events):
        lines.append("  (no model failed)")

    ok = report.statuses.get(200, 0)
    errors = sum(n for status, n in report.statuses.items() if status != 200)
    detail = ", ".join(
        f"{labels['from_tier']}->{labels['to_tier']} {_count(value)}"
        for labels, value in _samples(registry, "session_upgrades_total")
        if value
    )
    lines += [
        "",
        f"Clients: {ok} x 200 OK, {errors} errors ({report.retried} requests retried on "
        "another model)",
        f"Sessions: {report.conversations} conversations; upgrades: {detail or 'none'}",
    ]
    return lines


def run_demo(*, seed: int = 7, requests: int = 300, out: TextIO) -> int:
    progress = out if out.isatty() else None
    with _quiet_logs():
        report = asyncio.run(simulate(seed, requests, progress))
    out.write("\n".join(render(report)) + "\n")
    return 0


__all__ = ["DEMO_CONFIG", "FakeProviders", "Report", "render", "run_demo", "simulate"]
