"""Step-0 preservation: the model's logits on a probe batch before and after growth.

widen_(..., probe_batch=x) runs the model on x before anything changes and again on the
grown model, and reports max |dlogits|, KL(small || wide) and the loss change. The KL
here is the package's one KL (the studies' metrics use it too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) in nats, computed in float64."""
    return float(_kl(F.log_softmax(logits_p.double(), -1), F.log_softmax(logits_q.double(), -1)))


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) from log-probabilities."""
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def logits_of(output) -> torch.Tensor:
    """The logits of a causal LM's forward: growkern.GPT's (logits, loss), a transformers
    ModelOutput, or a tensor."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def check_probe(probe_batch, shape, device) -> None:
    """probe_batch is token ids (batch, seq), or (ids, targets), the model can read."""
    allowed = "allowed: an integer tensor of token ids (batch, seq), or a pair (ids, targets)"
    parts = list(probe_batch) if isinstance(probe_batch, (tuple, list)) else [probe_batch]
    if not 1 <= len(parts) <= 2 or not all(torch.is_tensor(t) for t in parts):
        got = type(probe_batch).__name__
        if isinstance(probe_batch, (tuple, list)):
            got += f" of ({', '.join(type(t).__name__ for t in parts)})"
        raise TypeError(f"probe_batch: got {got}; {allowed}")
    for what, t in zip(("ids", "targets"), parts):
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"probe_batch {what} have dtype {t.dtype}; {allowed}")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"probe_batch {what} have shape {tuple(t.shape)}; {allowed}")
        if t.device != device:
            raise ValueError(f"probe_batch {what} are on {t.device}, the model on {device}; move them")
    x = parts[0]
    if len(parts) == 2 and parts[1].shape != x.shape:
        raise ValueError(f"probe_batch targets have shape {tuple(parts[1].shape)}, the ids {tuple(x.shape)}; "
                         f"they must match")
    if len(parts) == 1 and x.shape[1] < 2:
        raise ValueError("probe_batch ids without targets need sequences of 2 or more tokens "
                         "(the targets are the ids shifted by one)")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= shape.vocab_size:
        raise ValueError(f"probe_batch ids range over [{lo}, {hi}]; allowed: [0, {shape.vocab_size - 1}] "
                         f"(vocab_size {shape.vocab_size})")
    if len(parts) == 2:
        y = parts[1][parts[1] != -100]  # the ignore index of nll_loss and transformers' labels
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= shape.vocab_size):
            raise ValueError(f"probe_batch targets range over [{int(y.min())}, {int(y.max())}]; allowed: "
                             f"[0, {shape.vocab_size - 1}], or -100 to ignore a position")
    if shape.n_positions is not None and x.shape[1] > shape.n_positions:
        raise ValueError(f"probe_batch sequences have {x.shape[1]} tokens; the model has {shape.n_positions} "
                         f"positions")


def probe_logits(model, probe_batch):
    x = probe_batch[0] if isinstance(probe_batch, (tuple, list)) else probe_batch
    y = probe_batch[1] if isinstance(probe_batch, (tuple, list)) and len(probe_batch) > 1 else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = logits_of(model(x))
    model.train(was_training)
    logits = logits.double()
    if y is None:
        logits, y = logits[:, :-1], x[:, 1:]
    return logits, y.long()  # nll_loss takes int64 targets only; check_probe allows any integer dtype


def preservation(small_logits, wide_logits, y) -> dict:
    lp_s = F.log_softmax(small_logits, -1)
    lp_w = F.log_softmax(wide_logits, -1)
    kl = _kl(lp_s, lp_w)  # the logits are float64 already (probe_logits)
    loss_s = F.nll_loss(lp_s.flatten(0, 1), y.flatten())
    loss_w = F.nll_loss(lp_w.flatten(0, 1), y.flatten())
    return {"max_abs_dlogits": float((wide_logits - small_logits).abs().max()),
            "kl_small_wide": float(kl), "dloss": float(loss_w - loss_s),
            "loss_small": float(loss_s), "loss_wide": float(loss_w)}
