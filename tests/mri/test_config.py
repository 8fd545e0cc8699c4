"""The config schema: shipped configs load, and bad keys, types and values are refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mri.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    list_configs,
    load_config,
)

# The presets and the paper's experiments that the docs and the Makefile name; a file that is
# renamed or dropped must fail here, not in a user's shell.
EXPECTED = {
    "cpu-tiny",
    "cpu-demo",
    "knee-pgd-r12-e2e",
    "knee-pgd-r12-gleam",
    "knee-pgd-r16-e2e",
    "knee-pgd-r16-gleam",
    "knee-modl-r4-e2e",
    "knee-modl-r4-gleam",
    "knee-modl-r16-e2e",
    "knee-modl-r16-gleam",
    "brain-pgd-r8-e2e",
    "brain-pgd-r8-gleam",
    "cine-pgd-r10-e2e",
    "cine-pgd-r10-gleam",
    "cine-modl-r10-gleam",
}


def _valid() -> dict[str, Any]:
    return config_to_dict(load_config("cpu-tiny"))


def _refused(raw: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _with(section: str, key: str, value: Any) -> dict[str, Any]:
    raw = _valid()
    raw[section][key] = value
    return raw


# --- shipped configs ---------------------------------------------------------------------------


def test_list_configs_names_every_shipped_file():
    names = list_configs()
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert EXPECTED <= set(names)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_config_loads_and_is_described(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    # Each file must say where its numbers come from.
    assert len(cfg.description) > 40
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#")


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.startswith("cpu-")))
def test_paper_configs_cite_the_paper_and_say_what_is_assumed(name):
    cfg = load_config(name)
    assert "paper" in cfg.description.lower()
    assert "assumed" in cfg.description.lower()


def test_shipped_configs_round_trip_through_dict():
    for name in list_configs():
        cfg = load_config(name)
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_pairs_compare_methods_at_the_stated_depths():
    # The paper's equal-memory comparisons: GLEAM buys depth N at M stages of N/M unrolls.
    pairs = {"brain-pgd-r8": (8, 24, 3), "cine-pgd-r10": (4, 12, 3)}
    for stem, (n_e2e, n_gleam, m) in pairs.items():
        e2e, gleam = load_config(f"{stem}-e2e"), load_config(f"{stem}-gleam")
        assert (e2e.train.method, e2e.model.num_unrolls) == ("e2e", n_e2e)
        assert (gleam.train.method, gleam.model.num_unrolls, gleam.train.splits) == (
            "gleam",
            n_gleam,
            m,
        )
        assert gleam.model.num_unrolls // gleam.train.splits == e2e.model.num_unrolls
        assert gleam.data == e2e.data


def test_cine_configs_use_kt_masks_and_3d_convolutions():
    for name in list_configs():
        cfg = load_config(name)
        assert (cfg.data.kind == "cine") == (cfg.data.mask == "kt")
        if cfg.data.kind == "cine":
            assert cfg.model.conv_dim == 3


def test_cpu_tiny_is_tiny():
    cfg = load_config("cpu-tiny")
    assert cfg.data.kind == "2d" and max(cfg.data.shape) <= 32
    assert (cfg.data.num_train, cfg.data.num_val, cfg.data.num_test) == (4, 2, 2)
    assert cfg.model.num_unrolls == 4 and cfg.model.features == 8
    assert cfg.train.splits == 2 and cfg.train.iterations <= 10
    assert cfg.eval.cs_iters == 10


# --- loading -----------------------------------------------------------------------------------


def test_overrides_replace_dotted_keys():
    cfg = load_config("cpu-demo", {"train.iterations": 3, "data.accel": 4, "name": "quick"})
    assert cfg.train.iterations == 3
    assert cfg.data.accel == 4.0
    assert cfg.name == "quick"
    assert load_config("cpu-demo").train.iterations != 3


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config("cpu-tiny", {"train.lrr": 1.0})
    with pytest.raises(ConfigError, match=r"train\.iterations"):
        load_config("cpu-tiny", {"train.iterations": 0})


def test_override_into_an_empty_section_of_the_file(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text("name: bare\ntrain:\n")
    assert load_config(path, {"train.iterations": 7}).train.iterations == 7


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(_valid()))
    assert load_config(path) == load_config("cpu-tiny")
    assert load_config(str(path)) == load_config("cpu-tiny")


def test_unknown_name_lists_shipped_configs():
    with pytest.raises(ConfigError) as info:
        load_config("no-such-config")
    message = str(info.value)
    assert "no-such-config" in message
    for name in ("cpu-tiny", "cpu-demo", "knee-pgd-r12-gleam"):
        assert name in message


def test_missing_file_lists_shipped_configs(tmp_path):
    with pytest.raises(ConfigError, match="cpu-demo"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_top_level_key_is_refused_by_name():
    raw = _valid()
    raw["trian"] = {}
    message = _refused(raw, "trian", "unknown key")
    assert "train" in message  # the valid keys are listed


@pytest.mark.parametrize("section", ["data", "model", "train", "eval"])
def test_unknown_key_inside_a_section_is_refused_with_its_dotted_name(section):
    raw = _valid()
    raw[section]["lrr"] = 1
    message = _refused(raw, f"{section}.lrr", "unknown key")
    # The message names the key as it is written in an override, not with a hidden prefix.
    assert message.startswith(f"{section}.lrr")


def test_a_section_that_is_not_a_mapping_is_refused():
    raw = _valid()
    raw["train"] = [1, 2]
    _refused(raw, "train", "mapping")


# --- wrong types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "lr", "fast", "float"),
        ("train", "lr", "1e-4", "float"),  # YAML 1.1 reads 1e-4 without a dot as a string
        ("model", "num_unrolls", 2.5, "int"),
        ("model", "num_unrolls", True, "int"),
        ("train", "checkpoint_blocks", 1, "bool"),
        ("train", "iterations", "10", "int"),
        ("data", "shape", 96, "list"),
        ("data", "shape", [96, "96"], "int"),
        ("data", "kind", "4d", "'2d'"),
        ("model", "conv_dim", 2.0, "2 or 3"),
        ("train", "method", "greedy", "'gleam'"),
        ("train", "devices", [0, 1.5], "int or str"),
        ("eval", "cs_lamda", "auto", "float or null"),
    ],
)
def test_wrong_types_are_refused_naming_key_and_expected_type(section, key, value, expected):
    message = _refused(_with(section, key, value), f"{section}.{key}", "expected", expected)
    assert message.startswith(f"{section}.{key}")


def test_ints_are_accepted_where_floats_are_expected():
    cfg = config_from_dict(_with("train", "lr", 1))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


# --- impossible values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("data", "accel", 0.5),
        ("data", "num_coils", 0),
        ("data", "shape", [4, 32]),
        ("data", "shape", [32, 32, 32]),
        ("data", "center_fraction", 0.0),
        ("train", "lr", -1e-3),
        ("train", "lr", 0),
        ("train", "lr", float("nan")),
        ("train", "iterations", 0),
        ("train", "batch_size", 0),
        ("model", "num_unrolls", 0),
        ("model", "step_size", 1.0),
        ("model", "mu", 0.0),
        ("eval", "cs_iters", 0),
    ],
)
def test_impossible_values_are_refused_by_name(section, key, value):
    _refused(_with(section, key, value), f"{section}.{key}")


def test_more_splits_than_unrolls_is_refused():
    raw = _valid()
    raw["train"]["splits"] = raw["model"]["num_unrolls"] + 1
    _refused(raw, "train.splits", str(raw["model"]["num_unrolls"]))


def test_splits_do_not_matter_end_to_end():
    raw = _valid()
    raw["train"].update(method="e2e", splits=99)
    assert config_from_dict(raw).train.method == "e2e"


@pytest.mark.parametrize("kind", ["3d", "cine"])
def test_conv_dim_must_match_the_data_kind(kind):
    raw = _valid()
    raw["data"].update(kind=kind, shape=[8, 32, 32], mask="kt" if kind == "cine" else "poisson")
    _refused(raw, "model.conv_dim", "3")
    raw["model"]["conv_dim"] = 3
    assert config_from_dict(raw).model.conv_dim == 3


def test_2d_data_refuses_conv_dim_3():
    _refused(_with("model", "conv_dim", 3), "model.conv_dim")


def test_kt_mask_only_with_cine():
    _refused(_with("data", "mask", "kt"), "data.mask", "cine")
    raw = _valid()
    raw["data"].update(kind="cine", shape=[8, 32, 32], mask="poisson")
    raw["model"]["conv_dim"] = 3
    _refused(raw, "data.mask", "kt")


def test_pgleam_needs_devices():
    raw = _with("train", "method", "pgleam")
    _refused(raw, "train.devices", "pgleam")
    raw["train"]["devices"] = []
    _refused(raw, "train.devices")
    raw["train"]["devices"] = ["cpu", "cpu"]
    assert config_from_dict(raw).train.devices == ["cpu", "cpu"]


# --- fuzz --------------------------------------------------------------------------------------

_SECTIONS = {
    "data": [f.name for f in dataclasses.fields(Config().data)],
    "model": [f.name for f in dataclasses.fields(Config().model)],
    "train": [f.name for f in dataclasses.fields(Config().train)],
    "eval": [f.name for f in dataclasses.fields(Config().eval)],
}
_JUNK_KEYS = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.none(), st.booleans())
# Valid literals too, so that some fuzzed configs get past the type checks.
_WORDS = ("2d", "3d", "cine", "poisson", "kt", "pgd", "modl", "gleam", "pgleam", "e2e", "cpu")
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(_WORDS),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-2, 2)), inner, max_size=3),
    ),
    max_leaves=8,
)


@st.composite
def _section_dicts(draw, keys: list[str]) -> dict[Any, Any]:
    chosen = draw(st.lists(st.one_of(st.sampled_from(keys), _JUNK_KEYS), max_size=6))
    return {k: draw(_VALUES) for k in chosen}


@st.composite
def _raw_configs(draw) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_VALUES)  # not even a mapping
    # Start from a valid config most of the time so the fuzz reaches the value checks too.
    raw: dict[Any, Any] = _valid() if draw(st.booleans()) else {}
    for section, keys in _SECTIONS.items():
        choice = draw(st.integers(0, 3))
        if choice == 1:
            raw.setdefault(section, {}).update(draw(_section_dicts(keys)))
        elif choice == 2:
            raw[section] = draw(_VALUES)
    for key in draw(st.lists(st.one_of(st.sampled_from(["name", "description"]), _JUNK_KEYS),
                             max_size=2)):  # fmt: skip
        raw[key] = draw(_VALUES)
    return raw


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_raw_configs())
def test_fuzz_config_from_dict_returns_a_config_or_raises_config_error(raw):
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        # A refusal starts by naming what it refuses: a dotted key path or the word config.
        head, sep, _ = str(err).partition(": ")
        assert sep and head.strip(), str(err)
        return
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [f"{s}.{k}" for s, keys in _SECTIONS.items() for k in keys]
            + ["train.lrr", "nope", "train.lr.deeper", "name", "data"]
        ),
        _VALUES,
        max_size=3,
    )
)
def test_fuzz_overrides_load_or_raise_config_error(overrides):
    try:
        cfg = load_config("cpu-tiny", overrides)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


def test_config_dir_is_inside_the_package():
    assert CONFIG_DIR == Path(__file__).resolve().parents[2] / "mri" / "configs"


def test_yaml_files_read_numbers_the_way_people_write_them(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "train:\n  lr: 1e-3\n  clip_grad_norm: 5E+1\n  mel_max_error: .5e-1\n"
        "data:\n  accel: 4\n  noise: 2.5e-2\n"
    )
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.clip_grad_norm == 50.0
    assert cfg.train.mel_max_error == 0.05
    assert cfg.data.noise == 0.025
    # Only numbers change: words and version-like strings stay strings.
    path.write_text("name: 1e\ndescription: v1e3\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.description) == ("1e", "v1e3")
