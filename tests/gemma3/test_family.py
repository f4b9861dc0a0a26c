"""The family seam: the names Gemma 3 gives its modules, tensors, tokens and chat turns."""

import pytest

from gemma_export.errors import CheckpointError
from gemma_export.gemma3 import family
from gemma_export.gemma3.config import preset


def test_every_linear_of_a_layer_is_a_module_of_the_model(tiny):
    names = dict(tiny.named_modules())
    for i in range(tiny.cfg.num_layers):
        for name in family.layer_linears(i):
            assert family.layer_of(name) == i and name in names
    assert family.TABLE in names and family.HEAD in names and family.layer_of(family.TABLE) is None
    grouped = [n for group in family.INPUT_GROUPS for n in group]
    assert sorted(grouped) == sorted(family.LINEARS)  # every linear reads exactly one group's input


def test_hf_and_gguf_names_map_to_our_parameters(tiny):
    params = dict(tiny.named_parameters())
    hf = ["model.layers.1.self_attn.q_proj.weight", "model.language_model.layers.0.mlp.down_proj.weight",
          "model.embed_tokens.weight", "model.norm.weight"]
    for key in hf:
        assert family.hf_param_name(key) in params, key
    assert family.hf_param_name("lm_head.weight") is None  # tied
    assert family.hf_param_name("model.vision_tower.vision_model.embeddings.patch_embedding.weight") is None
    gguf = {"blk.1.attn_q.weight": "layers.1.self_attn.q_proj.weight", "token_embd.weight": "embed_tokens.weight",
            "blk.0.post_ffw_norm.weight": "layers.0.post_feedforward_layernorm.weight",
            "output_norm.weight": "norm.weight"}
    for key, ours in gguf.items():
        assert family.gguf_param_name(key) == ours and ours in params
    assert family.gguf_param_name("output.weight") is None


def test_config_from_hf_reads_both_rope_layouts():
    base = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_key_value_heads": 1, "head_dim": 32, "sliding_window": 16, "sliding_window_pattern": 2}
    old = family.config_from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "old")
    new = family.config_from_hf({"text_config": {**base, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}}, "new")
    for cfg in (old, new):
        assert (cfg.rope_global_base, cfg.rope_local_base, cfg.rope_global_scaling) == (1e6, 1e4, 8.0)
        assert cfg.layer_types == preset("tiny").layer_types
    with pytest.raises(CheckpointError, match="missing field 'hidden_size'"):
        family.config_from_hf({}, "empty")


def test_chat_template_and_stop_tokens():
    assert family.CHAT_TEMPLATE.startswith("<bos><start_of_turn>user\n{prompt}<end_of_turn>\n")
    assert family.chat_text("Hi") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert family.STOP_TOKENS == ("<end_of_turn>", "<eos>")
