"""The public surface of `tier_middleware`: `__all__` is exactly what the package namespace
offers, so a name cannot be exported by accident nor forgotten."""

import inspect
import re
import types
import warnings
from collections.abc import Callable

import pytest

import tier_middleware
from configs import two_per_tier
from tier_middleware import (
    NoHealthyModel,
    NoHealthyModelError,
    RequestLimits,
    RetryConfig,
    SessionConfig,
    TierMiddlewareError,
    TierRoutingMiddleware,
    UnknownTier,
    UnknownTierError,
)

# Old names of renamed exceptions: the same classes, kept so that existing `except`s still work.
ALIASES = {"NoHealthyModel": NoHealthyModelError, "UnknownTier": UnknownTierError}


def namespace_names() -> list[str]:
    """What `tier_middleware.` offers: its public names and `__version__`, not its submodules
    (an imported submodule, `cli` say, becomes an attribute of the package)."""
    return [
        name
        for name, value in vars(tier_middleware).items()
        if (not name.startswith("_") or name == "__version__")
        and not isinstance(value, types.ModuleType)
    ]


def test_all_is_the_namespace_sorted() -> None:
    assert list(tier_middleware.__all__) == sorted(namespace_names())


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from tier_middleware import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(tier_middleware.__all__)


def test_version_is_the_distribution_version() -> None:
    from importlib.metadata import version

    assert tier_middleware.__version__ == version("tier-middleware")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", tier_middleware.__version__)


def exported_exceptions() -> list[tuple[str, type[BaseException]]]:
    return [
        (name, value)
        for name, value in vars(tier_middleware).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]


def test_every_exported_exception_ends_in_error_or_is_an_old_alias() -> None:
    names = [name for name, _ in exported_exceptions()]
    assert "FetchError" in names
    assert "ConfigError" in names
    for name, cls in exported_exceptions():
        if name in ALIASES:
            assert cls is ALIASES[name]
        else:
            assert name.endswith("Error"), name
            assert cls.__name__ == name


def test_every_exported_exception_shares_one_base() -> None:
    for name, cls in exported_exceptions():
        assert issubclass(cls, TierMiddlewareError), name


def test_old_exception_names_still_catch() -> None:
    with pytest.raises(NoHealthyModel):
        raise NoHealthyModelError("simple", 1.0)
    with pytest.raises(UnknownTier):
        raise UnknownTierError("x", ("simple",))


# -- option groups ----------------------------------------------------------------------------


async def app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


CONFIG = two_per_tier()


def test_option_groups_reach_the_middleware() -> None:
    mw = TierRoutingMiddleware(
        app,
        config=CONFIG,
        sessions=SessionConfig(header="X-Conversation", ttl=10.0),
        retries=RetryConfig(budget=0.5, failure_statuses=[500], retry_after_bounds=(2, 30)),
        limits=RequestLimits(max_body_bytes=1000, body_timeout=3),
    )
    assert mw.session_header == b"x-conversation"
    assert mw.failure_statuses == frozenset({500})
    assert mw.retry_after_bounds == (2, 30)
    assert mw.max_body_bytes == 1000
    assert mw.body_timeout == 3.0
    assert mw.retries.budget == 0.5


def test_the_flat_keywords_still_work_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="is deprecated; use sessions=") as caught:
        mw = TierRoutingMiddleware(app, config=CONFIG, session_ttl=5.0, session_header=None)
    assert sorted(str(w.message) for w in caught) == [
        "session_header= is deprecated; use sessions=SessionConfig(header=...)",
        "session_ttl= is deprecated; use sessions=SessionConfig(ttl=...)",
    ]
    assert mw.sessions.ttl == 5.0
    assert mw.session_header is None
    with pytest.warns(DeprecationWarning, match="limits=RequestLimits"):
        mw = TierRoutingMiddleware(
            app, config=CONFIG, limits=RequestLimits(body_timeout=2.0), max_body_bytes=64
        )
    # a flat keyword changes its one field of the group given beside it
    assert (mw.max_body_bytes, mw.body_timeout) == (64, 2.0)


def test_an_unknown_keyword_is_a_type_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="unexpected keyword argument 'max_body'"):
            TierRoutingMiddleware(app, config=CONFIG, max_body=5)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: SessionConfig(ttl=0), "ttl must be > 0"),
        (lambda: SessionConfig(max_sessions=0), "max_sessions must be an integer >= 1"),
        (lambda: SessionConfig(header=""), "header must be a header name or None"),
        (lambda: RetryConfig(budget=-1), "retry_budget must be >= 0"),
        (lambda: RetryConfig(budget_min=-1), "retry_budget_min must be >= 0"),
        (lambda: RetryConfig(retry_after_bounds=(5, 1)), "0 <= low <= high"),
        (lambda: RetryConfig(attempt_timeout=0), "attempt_timeout must be a positive"),
        (lambda: RequestLimits(max_body_bytes=0), "max_body_bytes must be >= 1"),
        (lambda: RequestLimits(body_timeout=float("inf")), "body_timeout must be a positive"),
    ],
)
def test_a_bad_option_fails_where_it_is_written(make: Callable[[], object], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        make()


def test_option_groups_are_frozen() -> None:
    limits = RequestLimits()
    with pytest.raises(AttributeError):
        limits.max_body_bytes = 5  # type: ignore[misc]
