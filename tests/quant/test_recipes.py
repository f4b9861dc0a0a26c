"""Recipes as data: presets, first-match rules, JSON/TOML round trips and refusals."""

import pytest

from gemma_export.errors import ConfigError
from gemma_export.quant.recipes import PRESETS, QuantRecipe, Rule, Scheme, Thresholds, resolve


def test_presets_exist():
    assert {"fp32", "int8", "int8-weights", "int4-b32", "int4-b128", "int4-b32-rtn", "int4-b128-rtn"} <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recipe_round_trips_json_and_toml(name, tmp_path):
    r = PRESETS[name]
    assert QuantRecipe.from_dict(r.to_dict()) == r
    f = tmp_path / "r.toml"
    f.write_text(r.to_toml())
    assert resolve(str(f)) == r
    j = tmp_path / "r.json"
    j.write_text(r.to_json())
    assert resolve(str(j)) == r


def test_first_matching_rule_wins():
    r = QuantRecipe("x", (Rule("layers.0.*", None), Rule("layers.*", Scheme(4, "block", 32))))
    assert r.scheme_for("layers.0.mlp.up_proj") is None
    assert r.scheme_for("layers.1.mlp.up_proj").bits == 4
    assert r.scheme_for("norm") is None


def test_bad_schemes_and_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="bits"):
        Scheme(bits=3)
    with pytest.raises(ConfigError, match="block size"):
        Scheme(bits=4, granularity="block", block_size=48)
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(bad))
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve("int3")
    with pytest.raises(ConfigError, match="recipe file not found"):
        resolve(str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="invalid thresholds"):
        Thresholds.from_dict({"min_top3": 0.5})


def test_smoothing_round_trips_and_is_validated(tmp_path):
    r = QuantRecipe("s", (Rule("layers.*", Scheme(8, activations="int8-dynamic")),), smoothing=0.5)
    assert r.needs_calibration
    path = tmp_path / "s.toml"
    path.write_text(r.to_toml())
    assert resolve(str(path)) == r
    with pytest.raises(ConfigError, match="smoothing"):
        QuantRecipe("bad", smoothing=1.5)


def test_what_a_recipe_asks_of_calibration_and_runtimes():
    assert not PRESETS["fp32"].needs_calibration and PRESETS["fp32"].is_float
    assert PRESETS["int4-b32"].needs_calibration and not PRESETS["int4-b32-rtn"].needs_calibration
    static = QuantRecipe("static", (Rule("layers.*", Scheme(8, activations="int8-static")),))
    assert static.needs_calibration and not static.runtime_quantizes_activations
    assert PRESETS["int8"].runtime_quantizes_activations and not PRESETS["int8-weights"].runtime_quantizes_activations


def test_compute_dtype_is_for_float_recipes_and_is_validated():
    assert PRESETS["fp16"].is_float and PRESETS["fp16"].compute_dtype == "fp16"
    assert "compute_dtype" not in PRESETS["fp32"].to_dict()  # manifests written before it stay as they were
    with pytest.raises(ConfigError, match="compute_dtype must be fp32 or fp16, got 'bf16'"):
        QuantRecipe("h", compute_dtype="bf16")
    with pytest.raises(ConfigError, match="compute_dtype fp16 is for unquantized recipes"):
        QuantRecipe("h", (Rule("layers.*", Scheme(8)),), compute_dtype="fp16")


def test_kv_dtype_names_the_recipe_round_trips_and_is_judged_relative(tmp_path):
    from gemma_export.quant.recipes import with_kv_dtype

    r = with_kv_dtype(PRESETS["int4-b32-rtn"], "int8")
    assert (r.name, r.kv_dtype, r.rules) == ("int4-b32-rtn+kv-int8", "int8", PRESETS["int4-b32-rtn"].rules)
    assert with_kv_dtype(r, "fp32") == PRESETS["int4-b32-rtn"] and with_kv_dtype(r, None) is r
    assert "kv_dtype" not in PRESETS["fp32"].to_dict()  # manifests written before it stay as they were
    path = tmp_path / "kv.toml"
    path.write_text(r.to_toml())
    assert resolve(str(path)) == r and QuantRecipe.from_dict(r.to_dict()) == r
    # the runtime's kernel rounds keys and values its own way: judged against fp32, like int8-dynamic
    kv8 = with_kv_dtype(PRESETS["fp32"], "int8")
    assert kv8.is_float and kv8.runtime_quantizes_activations
    with pytest.raises(ConfigError, match="kv_dtype must be one of fp32, fp16, int8, got 'int4'"):
        QuantRecipe("k", kv_dtype="int4")
