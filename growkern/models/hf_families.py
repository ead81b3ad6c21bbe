"""The Hugging Face model families growkern grows, one table each: parameter pattern -> axes.

Read a row as "this parameter's output axis is ..., its input axis is ...".
transformers is never imported here: its classes are named "transformers.Class", which
matches a class of that name defined in transformers (not a user's class that shares it).
The axes, what is exact and what is updated after growth are in docs/models.md.
"""
from __future__ import annotations

import math

from ..growth.adapter import (EMBEDDING, FINAL_NORM_BIAS, FINAL_NORM_GAIN, HEAD_NORM_GAIN, LM_HEAD, NORM_BIAS,
                              NORM_GAIN, POSITIONS, Adapter, Param, fused, linear, register_adapter)

L = r"\d+"  # a layer index

# --- Hugging Face transformers -----------------------------------------------------------


def _hf_init_std(config, name: str, spec: Param) -> float:
    return float(getattr(config, "initializer_range", 0.02))


def _gpt2_init_std(config, name: str, spec: Param) -> float:
    std = float(getattr(config, "initializer_range", 0.02))
    return std / math.sqrt(2 * config.n_layer) if spec.residual_out else std


def _gpt2_query_scale(config, index: int) -> float:
    return 1.0 / (index + 1) if getattr(config, "scale_attn_by_inverse_layer_idx", False) else 1.0


def _llama_like(prefix: str = "model") -> dict[str, Param]:
    """Llama, Mistral, Qwen2/3, Gemma2/3: separate q/k/v/o and gate/up/down projections."""
    layer = rf"{prefix}\.layers\.{L}"
    return {
        rf"{prefix}\.embed_tokens\.weight": EMBEDDING,
        rf"{layer}\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight": NORM_GAIN,
        rf"{layer}\.self_attn\.q_proj\.weight": linear("q", "d_model", out_role="query"),
        rf"{layer}\.self_attn\.q_proj\.bias": linear("q", "d_model", out_role="query", bias=True),
        rf"{layer}\.self_attn\.[kv]_proj\.weight": linear("kv", "d_model"),
        rf"{layer}\.self_attn\.[kv]_proj\.bias": linear("kv", "d_model", bias=True),
        rf"{layer}\.self_attn\.o_proj\.weight": linear("d_model", "q"),
        rf"{layer}\.self_attn\.o_proj\.bias": linear("d_model", "q", bias=True),
        rf"{layer}\.self_attn\.[qk]_norm\.weight": HEAD_NORM_GAIN,
        rf"{layer}\.mlp\.(gate|up)_proj\.weight": linear("d_ff", "d_model"),
        rf"{layer}\.mlp\.(gate|up)_proj\.bias": linear("d_ff", "d_model", bias=True),
        rf"{layer}\.mlp\.down_proj\.weight": linear("d_model", "d_ff"),
        rf"{layer}\.mlp\.down_proj\.bias": linear("d_model", "d_ff", bias=True),
        rf"{prefix}\.norm\.weight": FINAL_NORM_GAIN,
        r"lm_head\.weight": LM_HEAD,
    }


LLAMA_KEYS = dict(d_model="hidden_size", d_ff="intermediate_size", n_head="num_attention_heads",
                  n_kv_head="num_key_value_heads", head_dim="head_dim", norm_eps="rms_norm_eps",
                  vocab_size="vocab_size", n_layer="num_hidden_layers")

# per-layer config entries: sliding vs full attention (Qwen2/3, Gemma2/3, Mistral where set)
LAYER_LISTS = dict(layer_lists=("layer_types",), layer_counts=("max_window_layers",))

LLAMA = Adapter(
    name="llama",
    classes=("transformers.LlamaForCausalLM", "transformers.MistralForCausalLM", "transformers.Qwen2ForCausalLM",
             "transformers.Qwen3ForCausalLM"),
    params=_llama_like(), config_keys=LLAMA_KEYS, init_std=_hf_init_std, **LAYER_LISTS,
)

_Q, _KV = ("q", "query"), ("kv", "produce")

PHI3 = Adapter(
    name="phi3",
    classes=("transformers.Phi3ForCausalLM",),
    params={
        r"model\.embed_tokens\.weight": EMBEDDING,
        rf"model\.layers\.{L}\.(input|post_attention)_layernorm\.weight": NORM_GAIN,
        rf"model\.layers\.{L}\.self_attn\.qkv_proj\.weight": fused(_Q, _KV, _KV),
        rf"model\.layers\.{L}\.self_attn\.o_proj\.weight": linear("d_model", "q"),
        rf"model\.layers\.{L}\.mlp\.gate_up_proj\.weight": fused(("d_ff", "produce"), ("d_ff", "produce")),
        rf"model\.layers\.{L}\.mlp\.down_proj\.weight": linear("d_model", "d_ff"),
        r"model\.norm\.weight": FINAL_NORM_GAIN,
        r"lm_head\.weight": LM_HEAD,
    },
    config_keys=LLAMA_KEYS, init_std=_hf_init_std, **LAYER_LISTS,
)

GEMMA = Adapter(
    name="gemma",
    classes=("transformers.Gemma2ForCausalLM", "transformers.Gemma3ForCausalLM"),
    params=_llama_like(), config_keys=LLAMA_KEYS, init_std=_hf_init_std,
    gain_offset=1.0,  # Gemma's RMSNorm computes x_hat * (1 + weight)
    embed_multiplier=lambda shape: math.sqrt(shape.d_model),  # embeddings times sqrt(hidden_size)
    **LAYER_LISTS,
)

GPT2 = Adapter(
    name="gpt2",
    classes=("transformers.GPT2LMHeadModel",),
    params={
        r"transformer\.wte\.weight": EMBEDDING,
        r"transformer\.wpe\.weight": POSITIONS,
        rf"transformer\.h\.{L}\.ln_[12]\.weight": NORM_GAIN,
        rf"transformer\.h\.{L}\.ln_[12]\.bias": NORM_BIAS,
        # Conv1D stores (in, out); c_attn's outputs are [q | k | v]
        rf"transformer\.h\.{L}\.attn\.c_attn\.weight": fused(_Q, _KV, _KV, transposed=True),
        rf"transformer\.h\.{L}\.attn\.c_attn\.bias": fused(_Q, _KV, _KV, bias=True),
        rf"transformer\.h\.{L}\.attn\.c_proj\.weight": linear("d_model", "q", transposed=True, residual_out=True),
        rf"transformer\.h\.{L}\.attn\.c_proj\.bias": linear("d_model", "q", bias=True),
        rf"transformer\.h\.{L}\.mlp\.c_fc\.weight": linear("d_ff", "d_model", transposed=True),
        rf"transformer\.h\.{L}\.mlp\.c_fc\.bias": linear("d_ff", "d_model", bias=True),
        rf"transformer\.h\.{L}\.mlp\.c_proj\.weight": linear("d_model", "d_ff", transposed=True,
                                                             residual_out=True),
        rf"transformer\.h\.{L}\.mlp\.c_proj\.bias": linear("d_model", "d_ff", bias=True),
        r"transformer\.ln_f\.weight": FINAL_NORM_GAIN,
        r"transformer\.ln_f\.bias": FINAL_NORM_BIAS,
        r"lm_head\.weight": LM_HEAD,
    },
    # n_inner is always written: left None, a reload would build a 4 * n_embd MLP
    config_keys=dict(d_model="n_embd", d_ff="n_inner", n_head="n_head", norm_eps="layer_norm_epsilon",
                     vocab_size="vocab_size", n_layer="n_layer"),
    norm="layernorm", init_std=_gpt2_init_std, query_scale_at=_gpt2_query_scale,
)

for _adapter in (LLAMA, PHI3, GEMMA, GPT2):
    register_adapter(_adapter)
