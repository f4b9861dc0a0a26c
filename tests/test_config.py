import pytest

from gemma_export.config import GLOBAL, PRESETS, Gemma3Config, preset
from gemma_export.errors import ConfigError
from gemma_export.inspect import kv_cache_bytes, report


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


def test_window_cache_is_under_30_percent_for_1b_at_4096():
    r = report(preset("gemma3-1b"), 4096)
    assert r["kv_cache"]["window_over_full"] <= 0.30
    # 22 local layers x 512 + 4 global x 4096 positions, K and V, 256 dims, fp32
    assert kv_cache_bytes(preset("gemma3-1b"), 4096, True) == (22 * 512 + 4 * 4096) * 2 * 256 * 4


def test_config_round_trips_and_validates():
    cfg = preset("tiny")
    assert Gemma3Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        cfg.replace(num_heads=3, num_kv_heads=2)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gemma9")
