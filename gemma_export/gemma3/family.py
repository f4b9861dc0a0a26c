"""Gemma 3 as a model family: everything the rest of gemma-export knows about it by name.

The module names quantization walks and groups, the tied token table, the chat template and stop
tokens, and how Hugging Face and GGUF checkpoints spell the config and the tensors. Loading,
quantization, backends and packaging ask this module instead of spelling Gemma names themselves.
"""

from __future__ import annotations

from ..errors import CheckpointError
from .config import GLOBAL, SLIDING, Gemma3Config

# --- module names ----------------------------------------------------------------------------

TABLE = "embed_tokens"  # the token table, tied to the output head
HEAD = "lm_head"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# linears of one decoder layer that read the same input, in the order the layer runs them; each
# group's first member names it (calibration shares one input statistic per group)
INPUT_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def layer_linears(layer: int) -> list[str]:
    """Full module names of one decoder layer's linears."""
    return [f"layers.{layer}.{name}" for name in LINEARS]


def layer_of(module: str) -> int | None:
    """The decoder layer a module name belongs to (`layers.3.mlp.up_proj` -> 3), else None."""
    parts = module.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


# --- tokens and chat ---------------------------------------------------------------------------

SPECIAL_TOKENS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
                  "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"}
STOP_TOKENS = ("<end_of_turn>", "<eos>")
# one user turn, ending where the model's turn begins; {prompt} is the user's text
CHAT_TEMPLATE = "<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


# the same format as a Jinja chat template (runtimes that apply one from tokenizer_config.json)
CHAT_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def chat_text(prompt: str) -> str:
    """The chat template without its leading <bos> (a tokenizer adds that as an id)."""
    return CHAT_TEMPLATE.removeprefix(SPECIAL_TOKENS["bos"]).format(prompt=prompt)


# --- Hugging Face checkpoints ----------------------------------------------------------------

_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HF_SKIP = ("vision_tower", "multi_modal_projector", "model.vision_tower", "model.multi_modal_projector")


def hf_param_name(key: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name; None for tensors the text decoder does
    not hold (the vision tower and projector, the tied output head)."""
    if key.startswith(_HF_SKIP) or key == "lm_head.weight":
        return None
    for prefix in _HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _hf_text_config(raw: dict) -> dict:
    return raw.get("text_config", raw) if isinstance(raw.get("text_config"), dict) else raw


def _hf_rope(c: dict) -> tuple[float, float, float]:
    """(local base, global base, global linear scaling) from either transformers layout."""
    rope_global, rope_local, scaling = 1_000_000.0, 10_000.0, 1.0
    params = c.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5 layout
        rope_global = float(params["full_attention"].get("rope_theta", rope_global))
        if params["full_attention"].get("rope_type") == "linear":
            scaling = float(params["full_attention"].get("factor", 1.0))
        rope_local = float(params.get("sliding_attention", {}).get("rope_theta", rope_local))
    else:
        rope_global = float(c.get("rope_theta", rope_global))
        rope_local = float(c.get("rope_local_base_freq", rope_local))
        rs = c.get("rope_scaling") or {}
        if rs.get("rope_type", rs.get("type")) == "linear":
            scaling = float(rs.get("factor", 1.0))
    return rope_local, rope_global, scaling


def config_from_hf(raw: dict, name: str) -> Gemma3Config:
    """The text decoder's config from a Hugging Face config.json (text-only or multimodal)."""
    c = _hf_text_config(raw)
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        rope_local, rope_global, scaling = _hf_rope(c)
        layer_types = tuple(GLOBAL if t == "full_attention" else SLIDING for t in c.get("layer_types") or ())
        head_dim = int(c.get("head_dim") or hidden // heads)
        return Gemma3Config(
            name=name, vocab_size=int(c.get("vocab_size", 262_144)), hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads", heads)), head_dim=head_dim,
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", head_dim)),
            sliding_window=int(c.get("sliding_window", 512)),
            max_position_embeddings=int(c.get("max_position_embeddings", 32_768)),
            rope_local_base=rope_local, rope_global_base=rope_global, rope_global_scaling=scaling,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            global_every=int(c.get("sliding_window_pattern", 6)), layer_types=layer_types,
        )
    except KeyError as e:
        raise CheckpointError(f"config.json of {name}: missing field {e.args[0]!r}") from None


# --- GGUF checkpoints (llama.cpp's names) -----------------------------------------------------

GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# GGUF stores Gemma's norm weights as 1 + w; our RMSNorm holds w
GGUF_NORM_OFFSET = 1.0


def gguf_param_name(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name; None for the tied output head."""
    if name == "token_embd.weight":
        return f"{TABLE}.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_NAMES:
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return name


def is_norm(param: str) -> bool:
    return param.endswith("norm.weight")


def config_from_gguf(get, vocab: int | None, name: str) -> Gemma3Config:
    """The config from GGUF metadata; `get(key, default)` reads a metadata field."""
    arch = get("general.architecture")
    if arch != "gemma3":
        raise CheckpointError(f"{name}: GGUF architecture is {arch!r}, expected 'gemma3'")
    p = f"{arch}."
    hidden = int(get(p + "embedding_length"))
    heads = int(get(p + "attention.head_count"))
    head_dim = int(get(p + "attention.key_length", hidden // heads))
    layers = int(get(p + "block_count"))
    scaling = 1.0
    if get(p + "rope.scaling.type") == "linear":
        scaling = float(get(p + "rope.scaling.factor", 1.0))
    # llama.cpp's rule: the 27B scales queries by hidden/heads, every other size by head_dim.
    qpas = hidden / heads if layers == 62 else head_dim
    return Gemma3Config(
        name=name, vocab_size=vocab or 262_144, hidden_size=hidden,
        intermediate_size=int(get(p + "feed_forward_length")), num_layers=layers, num_heads=heads,
        num_kv_heads=int(get(p + "attention.head_count_kv", heads)), head_dim=head_dim,
        query_pre_attn_scalar=float(qpas), sliding_window=int(get(p + "attention.sliding_window", 512)),
        max_position_embeddings=int(get(p + "context_length", 32_768)),
        rope_global_base=float(get(p + "rope.freq_base", 1_000_000.0)), rope_global_scaling=scaling,
        rms_norm_eps=float(get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        bos_token_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(get("tokenizer.ggml.padding_token_id", 0)),
    )
