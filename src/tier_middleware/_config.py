"""Tier configuration: which (provider, model) pairs serve which tier, at what relative cost."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ._errors import ConfigError

DEFAULT_TIER_ORDER: tuple[str, ...] = ("simple", "moderate", "complex")
_TIER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an HTTP token


def _alias(snake: str) -> AliasChoices:
    head, *rest = snake.split("_")
    return AliasChoices(snake, head + "".join(part.title() for part in rest))


def normalize_tier(name: str) -> str:
    return name.strip().lower()


class ModelConfig(BaseModel):
    """One concrete model that can serve a tier."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    provider: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=256)
    relative_cost: int = Field(ge=1, validation_alias=_alias("relative_cost"))
    input_price_per_million: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, validation_alias=_alias("input_price_per_million")
    )
    output_price_per_million: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, validation_alias=_alias("output_price_per_million")
    )
    # Bounded so that a tier's total weight cannot overflow to infinity.
    weight: float | None = Field(default=None, gt=0, le=1e9, allow_inf_nan=False)

    @field_validator("provider", "model")
    @classmethod
    def _no_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        return value

    @property
    def effective_weight(self) -> float:
        """The selection weight: `weight` when given, else 1 / relative_cost."""
        return self.weight if self.weight is not None else 1.0 / self.relative_cost

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider, self.model)


class ProviderConfig(BaseModel):
    """Where the calls to one provider go when the app calls it through `UpstreamTransport`:
    its OpenAI-compatible `base_url`, the environment variable that holds its key (read at call
    time, so a rotated key is used at once), and the header that carries it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    base_url: str = Field(min_length=1, max_length=2048, validation_alias=_alias("base_url"))
    api_key_env: str | None = Field(default=None, validation_alias=_alias("api_key_env"))
    # "Name" (the key as the value, like Anthropic's x-api-key) or "Name: Scheme".
    auth_header: str = Field(
        default="Authorization: Bearer", validation_alias=_alias("auth_header")
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        scheme, sep, rest = value.partition("://")
        if scheme.lower() not in ("http", "https") or not sep or not rest or rest[0] == "/":
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        if "?" in rest or "#" in rest or any(c.isspace() for c in rest):
            raise ValueError("must be a plain URL: no query, fragment or spaces")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"must be an environment variable name, got {value!r}")
        return value

    @field_validator("auth_header")
    @classmethod
    def _header(cls, value: str) -> str:
        name, _, scheme = value.partition(":")
        name, scheme = name.strip(), scheme.strip()
        if not _HEADER_NAME.match(name) or not all(c.isalnum() or c in "-_" for c in scheme):
            raise ValueError(f"must be 'Header-Name' or 'Header-Name: Scheme', got {value!r}")
        return f"{name}: {scheme}" if scheme else name

    @cached_property
    def header(self) -> tuple[str, str]:
        """(lowercase header name, value prefix): ("authorization", "Bearer ")."""
        name, _, scheme = self.auth_header.partition(":")
        scheme = scheme.strip()
        return name.strip().lower(), f"{scheme} " if scheme else ""


class TierConfig(BaseModel):
    """The whole routing table: ordered tiers, each with at least one model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: str = "unversioned"
    updated_at: str | None = Field(default=None, validation_alias=_alias("updated_at"))
    tiers: dict[str, tuple[ModelConfig, ...]]
    tier_order: tuple[str, ...] = Field(
        default=DEFAULT_TIER_ORDER, validation_alias=_alias("tier_order")
    )
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("tiers", mode="before")
    @classmethod
    def _normalize_tier_names(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        out: dict[Any, Any] = {}
        for name, models in value.items():
            key = normalize_tier(name) if isinstance(name, str) else name
            if key in out:
                raise ValueError(f"tier {key!r} is declared twice")
            out[key] = models
        return out

    @field_validator("tier_order", mode="before")
    @classmethod
    def _normalize_order(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(normalize_tier(v) if isinstance(v, str) else v for v in value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.tier_order:
            raise ValueError("tier_order must name at least one tier")
        seen: set[str] = set()
        for name in self.tier_order:
            if not _TIER_NAME.match(name):
                raise ValueError(
                    f"tier name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-'"
                )
            if name in seen:
                raise ValueError(f"tier_order names tier {name!r} twice")
            seen.add(name)
        for name in self.tier_order:
            if not self.tiers.get(name):
                hint = "" if "tier_order" in self.model_fields_set else " (or declare tier_order)"
                raise ValueError(f"tier {name!r} has no models{hint}")
        for name, models in self.tiers.items():
            if name not in seen:
                raise ValueError(f"tier {name!r} is not in tier_order {list(self.tier_order)}")
            pairs: set[tuple[str, str]] = set()
            for m in models:
                if m.key in pairs:
                    raise ValueError(f"model {m.provider}/{m.model} appears twice in tier {name!r}")
                pairs.add(m.key)
        for name, provider in self.providers.items():
            if provider.api_key_env is not None and not os.environ.get(provider.api_key_env):
                # Never a call with no key: the config is refused where the user looks.
                raise ValueError(
                    f"provider {name!r}: environment variable {provider.api_key_env} "
                    "(api_key_env) is not set"
                )
        return self

    # -- lookups -------------------------------------------------------------------------

    @cached_property
    def ranks(self) -> dict[str, int]:
        """Tier name -> position in the order (higher is more capable)."""
        return {name: i for i, name in enumerate(self.tier_order)}

    def rank(self, tier: str) -> int:
        """Position of `tier` in the order; KeyError if unknown."""
        return self.ranks[tier]

    def __contains__(self, tier: object) -> bool:
        return tier in self.ranks

    def models(self, tier: str) -> tuple[ModelConfig, ...]:
        return self.tiers[tier]

    def find(self, tier: str, provider: str, model: str) -> ModelConfig | None:
        for m in self.tiers.get(tier, ()):
            if m.provider == provider and m.model == model:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that `TierConfig.load` reads back to an equal config."""
        return self.model_dump(mode="json")

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source: StaticConfig) -> TierConfig:
        """Build a config from a dict, a `.json` or `.toml` file, or a control-plane payload.

        The control-plane envelope `{"success": true, "data": {...}}` is accepted and unwrapped.
        Any problem raises `ConfigError` naming the source, the tier, the model and the field.
        """
        if isinstance(source, TierConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_data(source, source_name="config dict")
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            return cls.from_data(_read_file(path), source_name=str(path))
        raise ConfigError(
            f"cannot load a tier config from {type(source).__name__}; "
            "pass a dict, a TierConfig or the path of a .json or .toml file"
        )

    @classmethod
    def from_data(cls, data: Any, *, source_name: str = "config") -> TierConfig:
        data = _unwrap(data, source_name)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source_name}: {_describe(exc, data)}") from None


# A config given in-process rather than fetched: what `TierConfig.load` reads.
StaticConfig = TierConfig | Mapping[str, Any] | str | os.PathLike[str]


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(
            f"{path}: unsupported config file type {suffix or '(none)'!r}; use .json or .toml"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read config file: {exc.strerror or exc} ({_whereabouts(path)})"
        ) from None
    try:
        if suffix == ".json":
            return json.loads(raw)
        return tomllib.loads(raw.decode("utf-8"))
    except (
        ValueError,
        UnicodeDecodeError,
    ) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "JSON" if suffix == ".json" else "TOML"
        raise ConfigError(f"{path}: not valid {kind}: {exc} ({_whereabouts(path)})") from None


def _whereabouts(path: Path) -> str:
    """Where a relative path was looked for: a server started elsewhere misses the file."""
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was deleted
        return "working directory unknown"
    if path.is_absolute():
        return f"working directory {cwd}"
    return f"absolute path {os.path.normpath(os.path.join(cwd, path))}, working directory {cwd}"


def _unwrap(data: Any, source_name: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source_name}: a tier config must be an object, got {type(data).__name__}"
        )
    if data.get("success") is False and "tiers" not in data:
        message = data.get("error") or data.get("message") or "no reason given"
        raise ConfigError(f"{source_name}: the control plane reported failure: {message}")
    if "data" in data and "tiers" not in data:
        data = data["data"]
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source_name}: 'data' must be an object, got {type(data).__name__}")
    return data


_MESSAGES = {
    "missing": "is required",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "too_short": "must list at least one model",
    "tuple_type": "must be a list",
    "dict_type": "must be an object mapping tier names to lists of models",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


def _describe(exc: ValidationError, data: Any) -> str:
    """Turn pydantic's report into one line per problem, in the user's vocabulary."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        template = _MESSAGES.get(err["type"])
        ctx = err.get("ctx") or {}
        if template is not None:
            text = template.format(
                **{k: v for k, v in ctx.items() if isinstance(v, int | float | str)}
            )
        else:
            text = str(ctx.get("error", err["msg"]))
        where = ""
        field = ""
        if len(loc) >= 2 and loc[0] == "tiers":
            tier = loc[1]
            where = f"tier {tier!r}"
            if len(loc) >= 3 and isinstance(loc[2], int):
                where += f", {_model_label(data, tier, loc[2])}"
                field = ".".join(_snake(p) for p in loc[3:])
        elif loc:
            field = ".".join(_snake(p) for p in loc)
        message = f"{field} {text}" if field else text
        lines.append(f"{message} ({where})" if where else message)
    return "; ".join(lines)


def _snake(part: Any) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", str(part)).lower()


def _model_label(data: Any, tier: Any, index: int) -> str:
    try:
        tiers = data.get("tiers")
        entry = next(models for name, models in tiers.items() if normalize_tier(str(name)) == tier)[
            index
        ]
        return f"model {entry['provider']}/{entry['model']}"
    except Exception:  # a malformed entry has no name to show; its position still helps
        return f"model #{index + 1}"


__all__ = [
    "DEFAULT_TIER_ORDER",
    "ConfigError",
    "ModelConfig",
    "ProviderConfig",
    "StaticConfig",
    "TierConfig",
    "normalize_tier",
]
