"""muP (maximal update parameterization, Tensor Programs V): its rules over parameter kinds.

A GPTConfig with parameterization="mup" and mup_base_width=B is the standard
parameterization (SP, growkern's GPT-2 init and one LR) at d_model == B, and away from
it every parameter follows muP's width rules with the width multiplier

    m = d_model / mup_base_width

(one multiplier for the whole model: d_ff and n_head * head_dim are taken to scale with
d_model, as growth by a factor does). Per parameter kind, read off the adapter's Param
table (growkern/models/):

| kind   | parameters                        | init std        | Adam LR  | forward           |
| ------ | --------------------------------- | --------------- | -------- | ----------------- |
| hidden | q/k/v/o, gate/up/down (width x width) | SP std / sqrt(m) | lr / m | -                 |
| input  | wte, wpe (vocab/position x width) | SP std          | lr       | -                 |
| output | lm_head when untied (vocab x width) | SP std        | lr       | logits times 1/m  |
| vector | biases, norm gains                | SP (0 / 1)      | lr       | -                 |

With tied embeddings the one tensor is input (init and LR kept) and the logits take the
output multiplier 1/m in the forward (as mup's MuSharedReadout). The attention scale
stays 1/sqrt(head_dim): growkern grows heads at fixed head_dim, where 1/head_dim would
only be a width-independent constant. Under SP every multiplier is 1. docs/growth.md,
section "muP", has the derivation and what widen_ does with them.
"""
from __future__ import annotations

import math

from .adapter import Param, adapter_for

PARAMETERIZATIONS = ("sp", "mup")
KINDS = ("hidden", "input", "output", "vector")
FIXED_DIMS = ("vocab", "position")  # axes that do not grow with width


def is_mup(config) -> bool:
    """Whether a model config (any object) asks for muP."""
    return getattr(config, "parameterization", "sp") == "mup"


def width_mult(config) -> float:
    """m = d_model / mup_base_width under muP; 1 under SP."""
    if not is_mup(config):
        return 1.0
    return config.d_model / config.mup_base_width


def classify(kind: str, rows, cols) -> str:
    """The muP kind of a parameter from its Param kind and its row and column segments
    ((dim, role), ...): "hidden" when both axes are widths, "input" when a fixed axis
    (vocab, positions) writes a width (embeddings), "output" when a width is read into a
    fixed axis (the LM head), "vector" for biases and gains."""
    if kind != "matrix" or cols is None:
        return "vector"
    rows_fixed = all(d in FIXED_DIMS for d, _ in rows)
    cols_fixed = all(d in FIXED_DIMS for d, _ in cols)
    if rows_fixed and not cols_fixed:
        return "output" if all(r == "consume" for _, r in cols) else "input"
    if cols_fixed and not rows_fixed:
        return "input"
    return "hidden"


def param_kind(spec: Param) -> str:
    return classify(spec.kind, spec.rows, spec.cols)


def kinds(model) -> dict[str, str]:
    """name -> muP kind of every parameter of a model, from its adapter's table."""
    return {name: param_kind(spec) for name, spec in adapter_for(model).layout(model).items()}


def init_multiplier(kind: str, config) -> float:
    """Factor on the SP init std of a parameter of muP kind `kind`: 1/sqrt(m) for hidden
    matrices (fan-in variance 1/fan_in relative to the base width), 1 otherwise and under SP."""
    if not is_mup(config):
        return 1.0
    return 1.0 / math.sqrt(width_mult(config)) if kind == "hidden" else 1.0


def lr_multiplier(kind: str, config) -> float:
    """Factor on the base LR of a parameter of muP kind `kind` under Adam: 1/m (= base
    fan-in / fan-in) for hidden matrices, 1 for embeddings, the LM head, gains and
    biases, and under SP."""
    if not is_mup(config):
        return 1.0
    return 1.0 / width_mult(config) if kind == "hidden" else 1.0


def output_multiplier(config) -> float:
    """The factor on the logits: 1/m under muP, 1 under SP."""
    return 1.0 / width_mult(config)


def lr_multipliers(model) -> dict[str, float]:
    """name -> LR multiplier for every parameter of a model (tied weights once)."""
    return {name: lr_multiplier(kind, model.config) for name, kind in kinds(model).items()}


# --- szp: shrink, zero-pad, perturb at the muP scale -----------------------------------

def szp_shrink(kind: str, d_old: int, d_new: int, multiplier_form: bool) -> float:
    """The factor szp applies to kept entries: the one that keeps each tensor's muP scale
    at the new width. Under Adam a muP tensor's trained entries scale as its LR: hidden
    matrices as 1/fan_in, so they take fan_in_old / fan_in_new = d_old / d_new; the
    readout's effective weight (output multiplier times weight) as 1/fan_in too, which a
    muP model's output multiplier already applies (weight factor 1) and an SP model takes
    in its weights (d_old / d_new); inputs, biases and gains are width-independent (1)."""
    r = d_old / d_new
    if kind == "hidden":
        return r
    if kind == "output":
        return 1.0 if multiplier_form else r
    return 1.0


def szp_init_std(kind: str, init_std: float, d_old: int, d_new: int, multiplier_form: bool) -> float:
    """The std of szp's padded entries: the muP init at the new width. `init_std` is the
    wide model's own init std (already muP for a muP model, multiplier_form=True); for an
    SP model muP is taken with base width d_old: hidden std * sqrt(d_old / d_new), the
    readout's std * d_old / d_new (its output multiplier, absorbed), inputs unchanged."""
    if multiplier_form:
        return init_std
    r = d_old / d_new
    if kind == "hidden":
        return init_std * math.sqrt(r)
    if kind == "output":
        return init_std * r
    return init_std
