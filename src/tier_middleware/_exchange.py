"""One routed request, top to bottom: tier -> config -> entitlement -> session -> model ->
the app (once, or again on another model) -> what the outcome says about each model tried."""

from __future__ import annotations

import inspect
import itertools
import time
from typing import ClassVar

import anyio.to_thread

from ._attempt import Attempt, current_attempt
from ._errors import (
    NoHealthyModelError,
    RequestError,
    config_unavailable,
    invalid_session_id,
    invalid_tier,
    tier_not_allowed,
    tier_unavailable,
    too_deep,
)
from ._health import Key
from ._payload import TooDeep
from ._request import ClientGone, Request
from ._router import Selection, TierRouter
from ._sessions import Decision, decide, held_tier, session_key, valid_session_id
from ._stores import SessionRecord
from ._types import Headers

_unique = itertools.count()  # fingerprints of bodies that were not held: each is distinct

# A failure held until the request's outcome says whose it was: (selection, Retry-After,
# when the attempt began on the health clock).
Failure = tuple[Selection, float | None, float]


class Exchange(Request):
    """One routed request: what was read from the client, and each attempt at the app."""

    attempt_type: ClassVar[type[Attempt]] = Attempt  # a TracedExchange's attempts are traced

    attempts = 0
    tier = ""
    retries = 0  # retry-budget slots held
    tried: tuple[Key, ...] = ()  # the models that failed this request, for a retry
    failures: list[Failure] | None = None  # model failures not yet judged
    suspected: bool | None = None  # whether the body is a known poison request

    async def run(self) -> None:
        mw = self.mw
        try:
            tier = await self.read_tier()
            if tier is None:
                await mw.app(self.scope, self.replaying(), self.send)
                return
            router = mw.router or await self._first_config()
            if tier not in router.ranks or self.policy.allowed_tiers is not None:
                tier = self._check_tier(tier, router)
            self.tier = tier
            if mw.authorize is not None:
                await self._authorize(tier)
            decision: Decision | None = None
            key = ""
            try:
                if self.session_raw is None and not router.leases_probes:
                    selection = router.select_now(tier)  # the common case: nothing to await
                else:
                    key, decision, selection = await self._select(router)
            except NoHealthyModelError as exc:
                await self._unavailable(exc)
                return
            mw.metrics.request(self.tier)
            if decision is not None and decision.upgraded_from is not None:
                mw.metrics.session_upgrade(decision.upgraded_from, self.tier)
            served = await self._call_app(selection)
            if decision is not None and served is not None:
                await self._save_session(key, decision, served)
        except RequestError as err:
            await err.send(self.send, self.close_after())
        except ClientGone:
            return  # nobody is left to answer, and the app need not spend a model call

    # -- reading the request ------------------------------------------------------------------

    def _check_tier(self, tier: str, router: TierRouter, held: bool = False) -> str:
        """`tier` if the config has it and the route allows it; `held`: the tier is the one a
        session holds the request at, checked as a requested one is."""
        config = router.config
        if tier not in config.ranks:
            raise invalid_tier(
                f"unknown tier {tier!r}; valid tiers: {', '.join(config.tier_order)}"
            )
        allowed = self.policy.allowed_tiers
        if allowed is not None and tier not in allowed:
            what = f"this session is at tier {tier!r}, which" if held else f"tier {tier!r}"
            raise tier_not_allowed(
                f"{what} is not allowed on this route; allowed: "
                f"{', '.join(t for t in config.tier_order if t in allowed)}"
            )
        return tier

    async def _authorize(self, tier: str) -> None:
        """Ask `authorize=`: an async one on the event loop, a sync one in a worker thread (it
        may look a key up in a database)."""
        mw = self.mw
        authorize = mw.authorize
        if authorize is None:
            return
        if mw.authorize_in_thread:
            allowed = await anyio.to_thread.run_sync(authorize, self.scope, tier)
        else:
            allowed = authorize(self.scope, tier)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise tier_not_allowed(f"this caller may not use tier {tier!r}")

    async def _first_config(self) -> TierRouter:
        """Wait (up to `config_timeout`) for a first config from the control plane."""
        mw = self.mw
        if mw.router is None:
            await mw.configs.ready(mw.config_timeout)
            if mw.router is None:
                raise config_unavailable(
                    "no tier configuration is available yet", mw.retry_after_bounds
                )
        return mw.router

    # -- choosing and calling -----------------------------------------------------------------

    async def _select(self, router: TierRouter) -> tuple[str, Decision | None, Selection]:
        """Select with a session (sticky, never down a tier) or with a fleet-wide probe lease:
        (session key, session decision, selection)."""
        mw = self.mw
        state = mw.state
        if self.session_raw is not None and mw.session_header is not None:
            session_id = valid_session_id(self.session_raw)
            if session_id is None:
                raise invalid_session_id()
            key = session_key(mw.identity(self.scope), session_id)
            record = await state.load_session(key, router.ranks)
            held = held_tier(router.config, record, self.tier)
            if held != self.tier:  # a session never goes down a tier: checked as if asked for
                self.tier = self._check_tier(held, router, held=True)
                await self._authorize(held)
            decision = await decide(router, record, self.tier, time.time())
            return key, decision, decision.selection
        if not router.leases_probes:
            return "", None, router.select_now(self.tier)
        await state.sync_health()
        return "", None, await router.select(self.tier)

    async def _unavailable(self, exc: NoHealthyModelError) -> None:
        """The 503 short-circuit: no model of the tier can take the request now (the tier a
        session raised the request to, if it did)."""
        mw = self.mw
        tier = self.tier = exc.tier
        mw.metrics.request(tier)
        mw.metrics.unavailable(tier)
        error = tier_unavailable(tier, exc.retry_after, mw.retry_after_bounds)
        await error.send(self.send, [(b"x-tier", tier.encode()), (b"x-tier-attempts", b"0")])

    async def _call_app(self, selection: Selection) -> Selection | None:
        """Call the app with `selection`, and again with another model while a failure may be
        retried. Returns the selection that served the request, None when it failed."""
        mw = self.mw
        metrics = mw.metrics
        base_headers = self._base_headers()
        # A body that was not held (a large upload, say) cannot be sent twice.
        max_attempts = self.policy.max_attempts if self.buffered is not None else 1
        budget = mw.budget
        timeouts = mw.timeouts
        budget.active += 1
        try:
            while True:
                self.attempts += 1
                attempt = self.attempt_type(self, selection, self.attempts < max_attempts)
                try:
                    scope = attempt.scope(base_headers)
                except TooDeep:
                    await attempt.release()
                    raise too_deep() from None
                metrics.selection(selection)
                token = current_attempt.set(attempt)
                attempt.begin()
                if timeouts is not None:
                    attempt.deadline = timeouts.start()  # settled at the response start
                try:
                    await mw.app(scope, attempt.receive, attempt.send)
                except BaseException as exc:
                    error: Exception
                    if attempt.deadline is not None and attempt.deadline.absorb():
                        # Our own deadline cancelled the app before it started a response.
                        error = TimeoutError(f"no response within {mw.attempt_timeout:g} s")
                    elif isinstance(exc, Exception):
                        error = exc
                    else:  # cancellation: nothing learned about the model
                        await attempt.release()
                        await self._abandon()
                        raise
                    # Unless the response was dropped for a retry already, judge the exception:
                    # it propagates unchanged unless another model takes the request.
                    if attempt.next is None and not await attempt.raised(error):
                        if error is exc:
                            raise
                        await attempt.answer_timeout()
                else:
                    if not attempt.recorded:
                        await attempt.release()  # the app answered nothing, or the client left
                    tap = attempt.tap
                    if tap is not None:
                        usage = tap.result()
                        if usage is not None:
                            metrics.usage(selection, *usage)
                finally:
                    current_attempt.reset(token)
                    if attempt.deadline is not None:
                        attempt.deadline.settle()
                retry = attempt.next
                if retry is None:
                    return None if attempt.failed or attempt.dropped else selection
                metrics.retry(self.tier, selection.model, retry.model)
                selection = retry
        finally:
            budget.active -= 1
            if self.retries:  # most requests hold no retry slot
                for _ in range(self.retries):
                    budget.done()
            if self.failures is not None:
                await self.settle()

    # -- whose fault --------------------------------------------------------------------------

    def hold_failure(self, failure: Failure) -> None:
        """A model failed this request: whose fault it is shows once the request is over."""
        if self.failures is None:
            self.failures = [failure]
        else:
            self.failures.append(failure)

    async def succeeded(self, selection: Selection) -> None:
        """The request got past every failure it met: those were the models' faults."""
        mw = self.mw
        failures, self.failures = self.failures, None
        for failed, retry_after, began in failures or ():
            mw.metrics.failure(failed)
            await mw.state.failure(failed, retry_after, began)
        if mw.state.shared_health:
            await mw.state.success(selection)
        else:
            mw.health.record_success(selection.provider, selection.model)

    def suspect(self) -> bool:
        """Whether the body already failed on two models (asked once, at the first failure)."""
        if self.suspected is None:
            self.suspected = self.mw.health.evidence.suspect(self.fingerprint())
        return self.suspected

    def fingerprint(self) -> int:
        """A fast hash of what the client sent, computed only once an attempt has failed."""
        if self.buffered is None:
            return next(_unique)
        return hash((self.tier, self.body))

    async def settle(self) -> None:
        """Failures this request never got past: evidence against each model, which counts once
        failures of enough distinct bodies agree; nothing at all for a suspect's."""
        mw = self.mw
        failures, self.failures = self.failures, None
        suspect = self.suspect()
        fingerprint = self.fingerprint()
        for selection, retry_after, began in failures or ():
            if suspect:
                await mw.state.release(selection)
            elif await mw.state.unconfirmed(selection, fingerprint, retry_after, began):
                mw.metrics.failure(selection)
        if suspect or mw.health.evidence.suspect(fingerprint):
            mw.metrics.suspect(self.tier)

    async def _abandon(self) -> None:
        """The request was cancelled: its held failures say nothing."""
        failures, self.failures = self.failures, None
        for selection, _, _ in failures or ():
            await self.mw.state.release(selection)

    # -- helpers ------------------------------------------------------------------------------

    async def _save_session(self, key: str, decision: Decision, served: Selection) -> None:
        """Store the session when it was created or upgraded, or moved to another model."""
        if decision.record is None and served is decision.selection:
            return
        now = time.time()
        created = decision.record.created_at if decision.record is not None else now
        record = SessionRecord(served.provider, served.model, served.tier, created, now)
        await self.mw.state.save_session(key, record)

    def _base_headers(self) -> Headers:
        """The request headers the app gets: without ours and the tier header, and for a
        rewritten body without its framing (each attempt adds a fresh content-length)."""
        mw = self.mw
        rewritten = self.payload is not None
        headers = self.headers
        named = self.named
        if named is not None and mw.request_drop_rare.isdisjoint(named):
            # What servers send: nothing to drop but, for a rewritten body, its length.
            kept = list(headers)
            length = named.get(b"content-length") if rewritten else None
            if length is not None:
                try:
                    kept.remove((b"content-length", length))
                except ValueError:  # the pair is not a tuple
                    return [h for h in headers if h[0] != b"content-length"]
            return kept
        drop = mw.request_drop_rewritten if rewritten else mw.request_drop
        if named is not None:
            return [h for h in headers if h[0] not in drop]
        return [(k, v) for k, v in headers if k.lower() not in drop]

    async def alternative(self, failed: Selection) -> Selection | None:
        """A model other than `failed` and those that failed before it to retry with, if the
        client is still there, the retry budget has room and the tier has a healthy model left."""
        self.tried += (failed.key,)
        mw = self.mw
        if self.disconnected:
            return None
        if not mw.budget.try_retry():
            mw.metrics.over_budget(self.tier)
            return None
        try:
            chosen = await mw.router.select(self.tier, exclude=self.tried)  # type: ignore[union-attr]
        except NoHealthyModelError:
            mw.budget.done()
            return None
        self.retries += 1
        return chosen
