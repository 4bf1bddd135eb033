"""The demo's summary: requests per tier, selections per model and phase, the health timeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from .._config import TierConfig
from ._fakes import Event
from ._tables import format_table

PHASES = ("before", "outage", "after")
SHOW_BACKOFFS = 3  # per model in the timeline, besides the last one

ModelKey = tuple[str, str, str]  # tier, provider, model


@dataclass
class Report:
    """What one run saw, and all that `render` reads."""

    seed: int
    requests: int
    step: float  # simulated seconds between two requests
    config: TierConfig
    down: str  # the provider that failed
    down_at: float
    up_at: float
    registry: CollectorRegistry
    namespace: str  # of the metrics in `registry`
    events: list[Event]
    phase_picks: dict[str, dict[ModelKey, float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    retried: int = 0
    conversations: int = 0

    def value(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(f"{self.namespace}_{name}", labels) or 0.0

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        wanted = f"{self.namespace}_{name}"
        return [
            (dict(sample.labels), sample.value)
            for family in self.registry.collect()
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
    tiers = config.tier_order
    models = [m for tier in tiers for m in config.models(tier)]
    providers = list(dict.fromkeys(m.provider for m in models))
    retries_by_tier: dict[str, float] = dict.fromkeys(tiers, 0.0)
    for labels, value in report.samples("model_retries_total"):
        retries_by_tier[labels["tier"]] = retries_by_tier.get(labels["tier"], 0.0) + value

    def cost(tier: str, provider: str, model: str) -> float:
        labels = {"tier": tier, "provider": provider, "model": model}
        return report.value("cost_usd_total", labels)

    lines = [
        f"tier-middleware demo: {report.requests} requests (seed {report.seed}), "
        f"one every {report.step:g} s of simulated time",
        f"{len(tiers)} tiers, {len(models)} models from {_series(providers)}",
        f"{report.down} is down from t={report.down_at:.1f}s to t={report.up_at:.1f}s",
        "",
        "Requests by tier",
    ]
    rows: list[list[str]] = []
    totals = [0.0, 0.0, 0.0, 0.0]
    for tier in tiers:
        row = [
            report.value("tier_requests_total", {"tier": tier}),
            retries_by_tier[tier],
            report.value("tier_unavailable_total", {"tier": tier}),
            sum(cost(tier, m.provider, m.model) for m in config.models(tier)),
        ]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        rows.append([tier, *map(_count, row[:3]), _usd(row[3])])
    rows.append(["total", *map(_count, totals[:3]), _usd(totals[3])])
    lines += format_table(["tier", "requests", "retries", "503s", "cost USD"], rows)

    lines += ["", f"Model selections (retries included; phases around the {report.down} outage)"]
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
        for labels, value in report.samples("session_upgrades_total")
        if value
    )
    lines += [
        "",
        f"Clients: {ok} x 200 OK, {errors} errors ({report.retried} requests retried on "
        "another model)",
        f"Sessions: {report.conversations} conversations; upgrades: {detail or 'none'}",
    ]
    return lines


__all__ = ["PHASES", "ModelKey", "Report", "render"]
