"""TierConfig / ModelConfig: loading from every supported source, and clear rejection of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tier_middleware import ConfigError, ModelConfig, TierConfig
from tier_middleware._config import DEFAULT_TIER_ORDER, normalize_tier


def model(provider: str = "openai", name: str = "gpt-4o-mini", **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"provider": provider, "model": name, "relative_cost": 1}
    entry.update(fields)
    return entry


def three_tiers(simple: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "tiers": {
            "simple": [model()] if simple is None else simple,
            "moderate": [model("openai", "gpt-4o", relative_cost=5)],
            "complex": [model("anthropic", "claude-opus", relative_cost=20)],
        }
    }


CONTROL_PLANE_DATA: dict[str, Any] = {
    "version": "42",
    "updatedAt": "2024-06-01T12:00:00Z",
    "tiers": {
        "simple": [
            {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "relativeCost": 1,
                "inputPricePerMillion": 0.15,
                "outputPricePerMillion": 0.6,
            },
            {"provider": "google", "model": "gemini-flash", "relativeCost": 2},
        ],
        "moderate": [{"provider": "openai", "model": "gpt-4o", "relativeCost": 5, "weight": 2.5}],
        "complex": [{"provider": "anthropic", "model": "claude-opus", "relativeCost": 20}],
    },
}


def check_control_plane(cfg: TierConfig) -> None:
    assert cfg.version == "42"
    assert cfg.updated_at == "2024-06-01T12:00:00Z"
    assert cfg.tier_order == ("simple", "moderate", "complex")
    mini, flash = cfg.models("simple")
    assert (mini.provider, mini.model, mini.relative_cost) == ("openai", "gpt-4o-mini", 1)
    assert (mini.input_price_per_million, mini.output_price_per_million) == (0.15, 0.6)
    assert (flash.provider, flash.model, flash.relative_cost) == ("google", "gemini-flash", 2)
    assert cfg.models("moderate")[0].weight == 2.5


# -- model config -------------------------------------------------------------------------------


def test_model_defaults_prices_to_zero_and_weight_to_none() -> None:
    m = ModelConfig.model_validate(model(relative_cost=4))
    assert m.input_price_per_million == 0.0
    assert m.output_price_per_million == 0.0
    assert m.weight is None
    assert m.effective_weight == pytest.approx(0.25)
    assert m.key == ("openai", "gpt-4o-mini")


def test_explicit_weight_overrides_relative_cost() -> None:
    m = ModelConfig.model_validate(model(relative_cost=100, weight=3.0))
    assert m.effective_weight == 3.0


def test_provider_and_model_names_are_stripped() -> None:
    m = ModelConfig.model_validate(model("  openai ", " gpt-4o\t"))
    assert m.key == ("openai", "gpt-4o")


def test_model_config_is_immutable() -> None:
    # The router caches pools built from these objects; mutating one in place must be impossible.
    m = ModelConfig.model_validate(model())
    with pytest.raises(ValidationError):
        m.relative_cost = 7  # type: ignore[misc]


# -- loading ------------------------------------------------------------------------------------


def test_load_dict_snake_case() -> None:
    cfg = TierConfig.load(
        {
            "version": "1",
            "updated_at": "2024-01-01",
            "tiers": {
                "simple": [model(input_price_per_million=0.15, output_price_per_million=0.6)],
                "moderate": [model("openai", "gpt-4o", relative_cost=5)],
                "complex": [model("anthropic", "claude-opus", relative_cost=20)],
            },
        }
    )
    assert cfg.version == "1"
    assert cfg.updated_at == "2024-01-01"
    assert cfg.tier_order == DEFAULT_TIER_ORDER == ("simple", "moderate", "complex")
    assert cfg.models("simple")[0].input_price_per_million == 0.15
    assert cfg.models("complex")[0].relative_cost == 20


def test_load_control_plane_payload_with_envelope() -> None:
    check_control_plane(TierConfig.load({"success": True, "data": CONTROL_PLANE_DATA}))


def test_load_control_plane_payload_without_envelope() -> None:
    check_control_plane(TierConfig.load(CONTROL_PLANE_DATA))


def test_load_json_file_with_envelope(tmp_path: Path) -> None:
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"success": True, "data": CONTROL_PLANE_DATA}))
    check_control_plane(TierConfig.load(path))
    check_control_plane(TierConfig.load(str(path)))


def test_load_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        """
version = "42"
updatedAt = "2024-06-01T12:00:00Z"

[[tiers.simple]]
provider = "openai"
model = "gpt-4o-mini"
relative_cost = 1
input_price_per_million = 0.15
outputPricePerMillion = 0.6

[[tiers.simple]]
provider = "google"
model = "gemini-flash"
relativeCost = 2

[[tiers.moderate]]
provider = "openai"
model = "gpt-4o"
relative_cost = 5
weight = 2.5

[[tiers.complex]]
provider = "anthropic"
model = "claude-opus"
relative_cost = 20
""",
        encoding="utf-8",
    )
    check_control_plane(TierConfig.load(path))


def test_toml_and_json_and_dict_give_equal_configs(tmp_path: Path) -> None:
    json_path = tmp_path / "a.JSON"  # the suffix check is case-insensitive
    json_path.write_text(json.dumps(CONTROL_PLANE_DATA))
    from_dict = TierConfig.load(CONTROL_PLANE_DATA)
    assert TierConfig.load(json_path) == from_dict
    assert TierConfig.load(from_dict.to_dict()) == from_dict


def test_numeric_version_becomes_text() -> None:
    cfg = TierConfig.load({**three_tiers(), "version": 7})
    assert cfg.version == "7"


def test_load_returns_an_existing_config_unchanged() -> None:
    cfg = TierConfig.load(three_tiers())
    assert TierConfig.load(cfg) is cfg


def test_custom_tier_order_camel_and_snake() -> None:
    tiers = {"fast": [model()], "smart": [model("openai", "gpt-4o")], "genius": [model("x", "y")]}
    for key in ("tier_order", "tierOrder"):
        cfg = TierConfig.load({"tiers": tiers, key: ["fast", "smart", "genius"]})
        assert cfg.tier_order == ("fast", "smart", "genius")
        assert cfg.rank("fast") < cfg.rank("smart") < cfg.rank("genius")
        assert "genius" in cfg
        assert "simple" not in cfg


def test_tier_names_are_normalized() -> None:
    cfg = TierConfig.load(
        {"tiers": {" Fast ": [model()], "SLOW": [model("x", "y")]}, "tierOrder": ["FAST", "slow"]}
    )
    assert cfg.tier_order == ("fast", "slow")
    assert set(cfg.tiers) == {"fast", "slow"}
    assert normalize_tier("  MiXeD ") == "mixed"


def test_same_model_name_under_two_providers_is_allowed() -> None:
    cfg = TierConfig.load(three_tiers([model("openai", "m"), model("azure", "m")]))
    assert [m.key for m in cfg.models("simple")] == [("openai", "m"), ("azure", "m")]


def test_same_model_in_two_tiers_is_allowed() -> None:
    data = three_tiers()
    data["tiers"]["moderate"].append(model())
    cfg = TierConfig.load(data)
    assert cfg.find("moderate", "openai", "gpt-4o-mini") is not None
    assert cfg.find("simple", "openai", "gpt-4o-mini") is not None


def test_find() -> None:
    cfg = TierConfig.load(three_tiers())
    found = cfg.find("moderate", "openai", "gpt-4o")
    assert found is not None
    assert found.relative_cost == 5
    assert cfg.find("moderate", "openai", "gpt-4o-mini") is None
    assert cfg.find("nope", "openai", "gpt-4o") is None


def test_to_dict_is_json_ready_and_round_trips() -> None:
    cfg = TierConfig.load(CONTROL_PLANE_DATA)
    text = json.dumps(cfg.to_dict())
    assert TierConfig.load(json.loads(text)) == cfg


# -- bad configs --------------------------------------------------------------------------------

BAD_MODEL_CASES = [
    pytest.param({"relative_cost": 0}, "relative_cost must be >= 1", id="cost-zero"),
    pytest.param({"relative_cost": -3}, "relative_cost must be >= 1", id="cost-negative"),
    pytest.param({"relative_cost": 1.5}, "relative_cost must be an integer", id="cost-fraction"),
    pytest.param({"relative_cost": "cheap"}, "relative_cost must be an integer", id="cost-text"),
    pytest.param({"weight": float("nan")}, "weight must be a finite number", id="weight-nan"),
    pytest.param({"weight": float("inf")}, "weight must be a finite number", id="weight-inf"),
    pytest.param(
        {"weight": float("-inf")}, "weight must be a finite number", id="weight-minus-inf"
    ),
    pytest.param({"weight": 0}, "weight must be > 0", id="weight-zero"),
    pytest.param({"weight": -1.0}, "weight must be > 0", id="weight-negative"),
    pytest.param(
        {"input_price_per_million": -0.01},
        "input_price_per_million must be >= 0",
        id="input-price-negative",
    ),
    pytest.param(
        {"outputPricePerMillion": float("nan")},
        "output_price_per_million must be a finite number",
        id="output-price-nan-camel",
    ),
]


@pytest.mark.parametrize(("fields", "expected"), BAD_MODEL_CASES)
def test_bad_model_field_names_source_field_tier_and_model(
    fields: dict[str, Any], expected: str
) -> None:
    data = three_tiers([model("openai", "gpt-4o"), model("openai", "gpt-4o-mini", **fields)])
    with pytest.raises(ConfigError) as info:
        TierConfig.load(data)
    message = str(info.value)
    assert message.startswith("config dict: ")
    assert f"{expected}" in message
    assert "(tier 'simple', model openai/gpt-4o-mini)" in message
    assert "gpt-4o)" not in message  # the valid sibling is not blamed


def test_error_message_matches_the_documented_example() -> None:
    with pytest.raises(ConfigError) as info:
        TierConfig.load(three_tiers([model("openai", "gpt-4o-mini", relative_cost=0)]))
    assert str(info.value) == (
        "config dict: relative_cost must be >= 1 (tier 'simple', model openai/gpt-4o-mini)"
    )


def test_camel_case_field_is_reported_in_snake_case() -> None:
    entry = {"provider": "openai", "model": "gpt-4o-mini", "relativeCost": 0}
    with pytest.raises(ConfigError, match=r"relative_cost must be >= 1 \(tier 'simple'"):
        TierConfig.load(three_tiers([entry]))


def test_config_error_is_a_value_error_and_hides_pydantic() -> None:
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the point is the base class
        TierConfig.load(three_tiers([model(relative_cost=0, weight=float("nan"))]))
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.__cause__ is None
    assert err.__suppress_context__
    message = str(err)
    assert "validation error" not in message.lower()
    assert "pydantic" not in message.lower()
    assert "input_value" not in message
    # Both problems of the entry are reported in one go.
    assert "relative_cost must be >= 1" in message
    assert "weight must be a finite number" in message


def test_missing_field_names_the_model_by_position_when_it_has_no_name() -> None:
    with pytest.raises(ConfigError) as info:
        TierConfig.load(three_tiers([model(), {"provider": "openai"}]))
    message = str(info.value)
    assert "model is required (tier 'simple', model #2)" in message
    assert "relative_cost is required (tier 'simple', model #2)" in message


def test_blank_provider_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"provider must not be blank \(tier 'simple'"):
        TierConfig.load(three_tiers([model("   ", "gpt-4o")]))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(three_tiers([]), "tier 'simple' has no models", id="empty-tier"),
        pytest.param(
            {"tiers": {"simple": [model()], "complex": [model()]}},
            "tier 'moderate' has no models (or declare tier_order)",
            id="default-order-tier-missing",
        ),
        pytest.param(
            {"tiers": {"fast": [model()]}, "tierOrder": ["fast", "smart"]},
            "tier 'smart' has no models",
            id="order-names-tier-without-models",
        ),
        pytest.param(
            {"tiers": {"fast": [model()], "smart": []}, "tier_order": ["fast", "smart"]},
            "tier 'smart' has no models",
            id="order-names-empty-tier",
        ),
        pytest.param(
            three_tiers([model("openai", "m"), model("azure", "m"), model("openai", "m")]),
            "model openai/m appears twice in tier 'simple'",
            id="duplicate-model",
        ),
        pytest.param(
            three_tiers([model("openai", "m"), model(" openai ", "m ")]),
            "model openai/m appears twice in tier 'simple'",
            id="duplicate-model-after-stripping",
        ),
        pytest.param(
            {**three_tiers(), "tiers": {**three_tiers()["tiers"], "extra": [model()]}},
            "tier 'extra' is not in tier_order",
            id="tier-outside-order",
        ),
        pytest.param(
            {"tiers": {"fast": [model()]}, "tier_order": ["fast", "FAST"]},
            "tier_order names tier 'fast' twice",
            id="order-duplicate",
        ),
        pytest.param(
            {"tiers": {"fast": [model()]}, "tier_order": []},
            "tier_order must name at least one tier",
            id="order-empty",
        ),
        pytest.param(
            {"tiers": {"a b": [model()]}, "tier_order": ["a b"]},
            "tier name 'a b' must be 1-64 characters",
            id="tier-name-with-space",
        ),
        pytest.param(
            {"tiers": {"Fast": [model()], "fast": [model()]}, "tier_order": ["fast"]},
            "tier 'fast' is declared twice",
            id="tier-declared-twice-after-normalizing",
        ),
        pytest.param({"version": "1"}, "tiers is required", id="no-tiers"),
        pytest.param({"tiers": []}, "tiers must be an object", id="tiers-not-object"),
        pytest.param(
            three_tiers(["gpt-4o"]),  # type: ignore[list-item]
            "must be an object (tier 'simple', model #1)",
            id="model-not-object",
        ),
        pytest.param(
            {"tiers": {**three_tiers()["tiers"], "simple": "gpt-4o"}},
            "must be a list (tier 'simple')",
            id="tier-not-list",
        ),
    ],
)
def test_bad_config_shapes(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        TierConfig.load(data)
    assert expected in str(info.value)
    assert str(info.value).startswith("config dict: ")


def test_control_plane_failure_is_reported() -> None:
    with pytest.raises(ConfigError, match="control plane reported failure: token expired"):
        TierConfig.load({"success": False, "data": None, "error": "token expired"})
    # A failure payload without any `data` key still says what went wrong.
    with pytest.raises(ConfigError, match="control plane reported failure: rate limited"):
        TierConfig.load({"success": False, "message": "rate limited"})


def test_control_plane_data_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="'data' must be an object, got list"):
        TierConfig.load({"success": True, "data": []})


def test_unsupported_source_type() -> None:
    with pytest.raises(ConfigError, match="cannot load a tier config from int"):
        TierConfig.load(42)  # type: ignore[arg-type]


# -- bad files ----------------------------------------------------------------------------------


def test_yaml_file_is_rejected_by_extension(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  simple: []\n")
    with pytest.raises(ConfigError) as info:
        TierConfig.load(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "unsupported config file type '.yaml'" in message
    assert ".json or .toml" in message


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        pytest.param(
            "tiers",
            json.dumps(CONTROL_PLANE_DATA).encode(),
            r"unsupported config file type '\(none\)'",
            id="without_extension",
        ),
        pytest.param("tiers.toml", b'version = "\xff\xfe"\n', "not valid TOML", id="toml_not_utf8"),
        pytest.param(
            "tiers.json",
            b"[1, 2, 3]",
            "a tier config must be an object, got list",
            id="json_not_an_object",
        ),
    ],
)
def test_a_file_that_holds_no_tier_config_is_rejected(
    tmp_path: Path, name: str, content: bytes, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        TierConfig.load(path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("tiers.json", b"{ this is : not json", "not valid JSON", id="garbage_json"),
        pytest.param(
            "tiers.toml",
            b"[[tiers.simple]\nprovider = = 'x'\n",
            "not valid TOML",
            id="garbage_toml",
        ),
        pytest.param("absent.json", None, "cannot read config file", id="missing"),
    ],
)
def test_an_unreadable_file_is_reported_after_its_path(
    tmp_path: Path, name: str, content: bytes | None, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:  # (None: there is no file)
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        TierConfig.load(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_invalid_values_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        """
[[tiers.simple]]
provider = "openai"
model = "gpt-4o-mini"
relative_cost = 1
weight = nan

[[tiers.moderate]]
provider = "openai"
model = "gpt-4o"
relative_cost = 2

[[tiers.complex]]
provider = "openai"
model = "o1"
relative_cost = 3
"""
    )
    with pytest.raises(ConfigError) as info:
        TierConfig.load(path)
    assert str(info.value) == (
        f"{path}: weight must be a finite number (tier 'simple', model openai/gpt-4o-mini)"
    )
