"""A small dense decoder-only transformer, written to be grown in width.

Every projection is its own nn.Linear (q, k and v are separate) so that each
weight has exactly one row axis and one column axis, each belonging to one
width dimension (d_model, d_ff, heads x head_dim). The growth engine relies on
that: the table ADAPTER at the bottom gives the axes of every parameter
(growkern/growth/adapter.py), from which growkern/growth/plan.py plans.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..growth import mup
from ..growth.adapter import (EMBEDDING, FINAL_NORM_BIAS, FINAL_NORM_GAIN, LM_HEAD, NORM_BIAS, NORM_GAIN, Adapter,
                              linear, register_adapter)
from ..growth.adapter import POSITIONS as POSITION_EMBEDDING

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    d_model: int = 128
    d_ff: int | None = None  # None means 4 * d_model
    norm: str = "layernorm"
    mlp: str = "gelu"
    pos: str = "learned"
    tie_embeddings: bool = True
    bias: bool = False
    dropout: float = 0.0
    # Growth that zero-pads the residual stream rescales eps with the gains,
    # which keeps the norms exact; so eps is part of the config.
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # "sp": GPT-2 init, one LR; "mup": muP relative to d_model == mup_base_width (None:
    # the d_model it is created with). growkern/mup.py, docs/growth.md section 9.
    parameterization: str = "sp"
    mup_base_width: int | None = None

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.parameterization == "mup" and self.mup_base_width is None:
            self.mup_base_width = self.d_model
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"GPTConfig: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be a positive int, got {v!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.pos in POSITIONS, f"pos must be one of {POSITIONS}, got {self.pos!r}")
        need(self.d_model % self.n_head == 0,
             f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        need(self.pos != "rope" or self.head_dim % 2 == 0,
             f"rope needs an even head_dim, got {self.head_dim}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.parameterization in mup.PARAMETERIZATIONS,
             f"parameterization must be one of {mup.PARAMETERIZATIONS}, got {self.parameterization!r}")
        v = self.mup_base_width
        need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
             f"mup_base_width must be a positive int or None, got {v!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.parameterization == "sp" and self.mup_base_width is None:
            # an SP config's dict (checkpoints, study cache keys) is what it was before muP
            del d["parameterization"], d["mup_base_width"]
        return d

    def replace(self, **changes) -> "GPTConfig":
        return replace(self, **changes)


def init_std(name: str, config: GPTConfig) -> float:
    """GPT-2 init of a parameter: N(0, 0.02), residual output projections scaled by
    1/sqrt(2 n_layer); biases 0 and norm gains 1 (std 0). Under muP, hidden matrices
    take 1/sqrt(d_model / mup_base_width) on top (growkern.growth.mup.init_multiplier)."""
    if name.endswith("bias") or is_norm_gain(name):
        return 0.0
    std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("o_proj.weight", "mlp.down.weight")) else 0.02
    if config.parameterization == "mup":
        std *= mup.init_multiplier(param_kind(name), config)
    return std


def is_norm_gain(name: str) -> bool:
    return name.endswith("weight") and (".ln_" in name or name.startswith("ln_f"))


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, eps read from the config."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.norm
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.d_model))
        has_bias = config.bias and config.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if has_bias else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(config: GPTConfig, device=None, dtype=torch.float32):
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd))
    t = torch.arange(config.block_size, dtype=torch.float64, device=device)
    angles = torch.outer(t, inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); rotate interleaved pairs (x0, x1), (x2, x3), ...
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hd = config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.q_proj = nn.Linear(config.d_model, config.n_head * hd, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * hd, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * hd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * hd, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, rope=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.n_kv_head != self.n_head:
            # query head h reads kv head h // group; the growth plan keeps that layout
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        if config.mlp == "swiglu":
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
            self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
            self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        else:
            self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
            self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = Attention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None):
        x = x + self.drop(self.attn(self.ln_1(x), rope))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.rebuild_buffers()
        self.reset_parameters()

    def rebuild_buffers(self):
        """(Re)build what depends on the config but is not trained: RoPE tables, norm eps."""
        c = self.config
        device = self.wte.weight.device
        if c.pos == "rope":
            cos, sin = rope_tables(c, device=device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        for m in self.modules():
            if isinstance(m, Norm):
                m.eps = c.norm_eps
            elif isinstance(m, Attention):
                m.n_head, m.n_kv_head, m.head_dim = c.n_head, c.n_kv_head, c.head_dim
                m.dropout = c.dropout
            elif isinstance(m, nn.Dropout):
                m.p = c.dropout

    def init_std(self, name: str) -> float:
        return init_std(name, self.config)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif is_norm_gain(name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.init_std(name), generator=generator)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.ln_f(x))
        if self.config.parameterization == "mup":
            logits = logits * mup.output_multiplier(self.config)  # 1/m; exactly 1.0 at the base width
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits.float(), dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx


L = r"\d+"  # a layer index

# --- how growkern grows it ---------------------------------------------------------------


def _gpt_finish(model):
    model.rebuild_buffers()  # RoPE tables live on the parameters' device


ADAPTER = register_adapter(Adapter(
    name="growkern.GPT",
    classes=(GPT,),  # the class itself: a user's class named GPT (nanoGPT's) is another model
    params={
        r"wte\.weight": EMBEDDING,
        r"wpe\.weight": POSITION_EMBEDDING,
        rf"blocks\.{L}\.ln_[12]\.weight": NORM_GAIN,
        rf"blocks\.{L}\.ln_[12]\.bias": NORM_BIAS,
        rf"blocks\.{L}\.attn\.q_proj\.weight": linear("q", "d_model", out_role="query"),
        rf"blocks\.{L}\.attn\.q_proj\.bias": linear("q", "d_model", out_role="query", bias=True),
        rf"blocks\.{L}\.attn\.[kv]_proj\.weight": linear("kv", "d_model"),
        rf"blocks\.{L}\.attn\.[kv]_proj\.bias": linear("kv", "d_model", bias=True),
        rf"blocks\.{L}\.attn\.o_proj\.weight": linear("d_model", "q"),
        rf"blocks\.{L}\.attn\.o_proj\.bias": linear("d_model", "q", bias=True),
        rf"blocks\.{L}\.mlp\.(gate|up)\.weight": linear("d_ff", "d_model"),
        rf"blocks\.{L}\.mlp\.(gate|up)\.bias": linear("d_ff", "d_model", bias=True),
        rf"blocks\.{L}\.mlp\.down\.weight": linear("d_model", "d_ff"),
        rf"blocks\.{L}\.mlp\.down\.bias": linear("d_model", "d_ff", bias=True),
        r"ln_f\.weight": FINAL_NORM_GAIN,
        r"ln_f\.bias": FINAL_NORM_BIAS,
        r"lm_head\.weight": LM_HEAD,
    },
    config_keys=dict(d_model="d_model", d_ff="d_ff", n_head="n_head", n_kv_head="n_kv_head",
                     norm_eps="norm_eps", vocab_size="vocab_size", n_layer="n_layer", norm="norm"),
    init_std=lambda config, name, spec: init_std(name, config),  # as GPT.reset_parameters
    build=GPT,
    head_dim_growth=lambda config: config.pos == "learned",  # rotary pairs do not survive it
    config_in_place=False,  # GPTConfig is a value; the model gets a new one
    finish=_gpt_finish,
    config_class=GPTConfig,
))




def param_kind(name: str) -> str:
    """The muP kind of a GPT parameter (growkern/growth/mup.py), by its row in ADAPTER."""
    return mup.param_kind(ADAPTER.spec_of(name))
