"""Gemma 3 configs: the presets' published sizes, the 5:1 layer pattern, validation and round trips."""

import pytest

from gemma_export.errors import ConfigError
from gemma_export.gemma3.config import GLOBAL, PRESETS, Gemma3Config, preset


def test_layer_pattern_is_five_local_one_global():
    cfg = preset("gemma3-1b")
    assert [i for i, t in enumerate(cfg.layer_types) if t == GLOBAL] == [5, 11, 17, 23]
    assert cfg.layer_types.count("sliding") == 22


@pytest.mark.parametrize("name,params", [("gemma3-270m", 268e6), ("gemma3-1b", 1000e6), ("gemma3-4b", 3880e6)])
def test_presets_have_published_sizes(name, params):
    total = PRESETS[name].param_counts()["total"]
    assert abs(total - params) / params < 0.01


def test_4b_is_published_config():
    c = preset("gemma3-4b")
    assert (c.sliding_window, c.rope_global_scaling, c.num_kv_heads, c.max_position_embeddings) == (1024, 8.0, 4, 131072)
    assert c.vocab_size == 262_208  # its image tokens are rows of the table


def test_config_round_trips_and_validates():
    cfg = preset("tiny")
    assert Gemma3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        cfg.replace(num_heads=3, num_kv_heads=2)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gemma9")
    with pytest.raises(ConfigError, match="unknown config fields"):
        Gemma3Config.from_dict({**cfg.to_dict(), "vision_layers": 27})


def test_runtime_context_defaults_and_limits():
    assert preset("gemma3-1b").runtime_context() == 4096
    assert preset("tiny").runtime_context() == 1024  # the default, capped at the model's limit
    assert preset("gemma3-1b").runtime_context(32_768) == 32_768
    with pytest.raises(ConfigError, match="outside 1..32768"):
        preset("gemma3-1b").runtime_context(40_000)
