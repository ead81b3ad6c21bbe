"""The data a study trains on and the held-out text it measures with: the TinyStories
corpus, the fixed validation windows, val loss and KL between two models on them."""
from __future__ import annotations

import contextlib
import copy

import torch

from ..growth.probe import kl_divergence
from ..growth.wrappers import unwrap
from ..train import data as data_mod
from ..train import loop as train_mod
from ..train.data import default_data


def load_corpus(data, vocab_size: int, cache_dir):
    """Tokenized TinyStories (growkern.data.prepare) with the study's data resolution."""
    return data_mod.prepare(default_data(data), vocab_size, cache_dir=cache_dir)


def heldout_windows(corpus, block_size: int, batch_size: int, n_batches: int) -> list:
    """Fixed, evenly spread validation windows, the same for every run of a study."""
    return data_mod.eval_batches(corpus.valid, block_size, batch_size, n_batches)


_DATA: dict = {}  # per process: (data, vocab, cache, windows) -> (corpus, windows)


def study_data(p, data, cache_dir):
    """The corpus and held-out windows of preset `p`, loaded once per process (a study's
    worker processes run many units on the same data)."""
    key = (str(data), p.vocab_size, str(cache_dir), p.block_size, p.eval_batch_size, p.eval_batches)
    if key not in _DATA:
        corpus = load_corpus(data, p.vocab_size, cache_dir)
        _DATA[key] = corpus, heldout_windows(corpus, p.block_size, p.eval_batch_size, p.eval_batches)
    return _DATA[key]


def val_loss(model, windows) -> float:
    """Mean next-token cross entropy (nats/token) on the windows, in float32 (no autocast)."""
    return train_mod.evaluate(model, windows, dtype=None)


@torch.no_grad()
def heldout_kl(model_p, model_q, windows) -> float:
    """KL(p || q) averaged over every held-out position (growkern.growth.probe.kl_divergence per batch,
    weighted by its number of positions)."""
    total = n = 0.0
    states = (model_p.training, model_q.training)
    model_p.eval()
    model_q.eval()
    try:
        dev_p = next(model_p.parameters()).device
        dev_q = next(model_q.parameters()).device
        for x, _ in windows:
            lp = model_p(x.to(dev_p))[0]
            lq = model_q(x.to(dev_q))[0].to(lp.device)
            total += kl_divergence(lp, lq) * x.numel()
            n += x.numel()
    finally:
        model_p.train(states[0])
        model_q.train(states[1])
    return total / n


def frozen_copy(model):
    """An evaluation-mode copy of the model, detached from its optimizer."""
    m = copy.deepcopy(unwrap(model))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def param_snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use n CPU threads inside (None: leave torch's setting). Tiny models train much
    faster on one thread than on two contended ones."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
