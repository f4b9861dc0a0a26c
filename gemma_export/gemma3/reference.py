"""transformers' Gemma3ForCausalLM as the golden reference for the architecture."""

from __future__ import annotations

from pathlib import Path

from .config import GLOBAL, Gemma3Config


def hf_config(cfg: Gemma3Config):
    from transformers import Gemma3TextConfig

    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_global_base},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base},
    }
    if cfg.rope_global_scaling != 1.0:
        rope["full_attention"] = {
            "rope_type": "linear", "factor": cfg.rope_global_scaling, "rope_theta": cfg.rope_global_base,
        }
    return Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar), sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        layer_types=["full_attention" if t == GLOBAL else "sliding_attention" for t in cfg.layer_types],
        rope_parameters=rope, attn_implementation="eager", pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=True,
    )


def hf_from_model(model):
    """A transformers model holding copies of our model's weights (for random-weight parity)."""
    import torch
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM(hf_config(model.cfg)).float().eval()
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    return _filled(hf, state)


def _filled(hf, state: dict):
    """`hf` holding `state` (every tensor but the tied head), checked name by name."""
    import torch

    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(torch.float32)


def hf_from_gguf(path: Path):
    """transformers' own GGUF loader: independent dequantization, name mapping and norm handling."""
    import torch
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return hf.eval()


def hf_logits(hf, ids) -> "torch.Tensor":
    """Full causal forward over ids, fp32: [N, V]."""
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float()


def hf_multimodal_config(text_cfg: Gemma3Config, vision_cfg):
    """transformers' Gemma3Config (text + SigLIP vision) for our two configs."""
    from transformers import Gemma3Config as HFConfig
    from transformers import SiglipVisionConfig

    v = vision_cfg
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
        attn_implementation="eager",
    )
    cfg = HFConfig(text_config=hf_config(text_cfg).to_dict(), vision_config=vision.to_dict(),
                   mm_tokens_per_image=v.tokens_per_image, boi_token_index=v.boi_token_id,
                   eoi_token_index=v.eoi_token_id, image_token_index=v.image_token_id)
    cfg._attn_implementation = "eager"
    return cfg


def hf_multimodal_from(model, vision):
    """transformers' Gemma3ForConditionalGeneration holding copies of our text and vision weights."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    hf = Gemma3ForConditionalGeneration(hf_multimodal_config(model.cfg, vision.cfg)).float().eval()
    state = {f"model.language_model.{k}": t for k, t in model.state_dict().items() if not k.startswith("lm_head")}
    for k, t in vision.state_dict().items():
        key = ("model.multi_modal_projector." + k.removeprefix("projector.") if k.startswith("projector.")
               else "model.vision_tower." + k)  # transformers 5 drops `vision_model.` in memory
        state[key] = t
    return _filled(hf, state)
