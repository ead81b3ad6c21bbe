"""Offline growth of a distributed (DCP) checkpoint, one tensor at a time
(growkern/offline.py): the same checkpoint as loading it whole, widen_ and saving."""
import json
import weakref

import numpy as np
import pytest
import torch

from growkern import GPTConfig, widen_
from growkern.train import checkpoint as C
from growkern.train import offline
from growkern.train.loop import TrainConfig, build_optimizer, build_scheduler, init_model, make_batches, train


def _tokens(n=5000, vocab=61):
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, n).astype(np.uint16)


def _dcp_checkpoint(path, parameterization="sp"):
    gcfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16,
                     parameterization=parameterization, mup_base_width=16)
    tcfg = TrainConfig(steps=8, batch_size=4, block_size=16, lr=1e-2, warmup=2, progress=False, eval_every=0)
    model = init_model(gcfg, 0)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    batches = make_batches(_tokens(), tcfg)
    train(model, opt, sched, batches, tcfg, end_step=3)
    C.save(path, model, opt, sched, step=3, train_config=tcfg, batches=batches, storage="dcp")
    return path


def _everything(path):
    ck = C.load(path)
    tensors = C._read_dcp(ck.path)
    state = torch.load(ck.path / C.STATE, weights_only=True)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in ck.optimizer.state_dict()["param_groups"]]
    return ck, tensors, state["scheduler"], groups


def _assert_same_checkpoints(ref_path, got_path):
    """The two checkpoints hold the same config, every tensor bit for bit (and dtype), the
    same optimizer groups and scheduler state. Returns (ref, got, got's tensors)."""
    ref, ref_t, ref_sched, ref_groups = _everything(ref_path)
    got, got_t, got_sched, got_groups = _everything(got_path)
    assert got.model.config == ref.model.config
    assert got_t.keys() == ref_t.keys()
    for k in ref_t:
        assert got_t[k].dtype == ref_t[k].dtype and torch.equal(got_t[k], ref_t[k]), k
    assert got_groups == ref_groups
    assert got_sched == ref_sched
    return ref, got, got_t


@pytest.mark.parametrize("strategy, parameterization", [("exact_copy", "sp"), ("perturb", "sp"), ("szp", "mup"),
                                                        ("structured", "sp"), ("perturb", "mup")])
def test_offline_growth_writes_what_widen_and_save_write(tmp_path, monkeypatch, strategy, parameterization):
    """Every tensor (weights, Adam moments, step counters) bit for bit, the optimizer's
    group LRs (muP), the scheduler state (szp restarts it) and the config equal those of
    load + widen_ + save(storage="dcp"); the writer never holds more than two new
    tensors at once."""
    src = _dcp_checkpoint(tmp_path / "src", parameterization)
    ck = C.load(src)
    widen_(ck.model, ck.optimizer, ck.scheduler, factor=2, strategy=strategy, seed=3)
    C.save(tmp_path / "ref", ck.model, ck.optimizer, ck.scheduler, step=ck.step, train_config=ck.train_config,
           data_state=ck.data, rng=ck.rng, storage="dcp")

    alive, most = [0], [0]
    real = C.write_dcp_lazily

    def counting(directory, specs, build):
        def tracked(key):
            t = build(key)
            alive[0] += 1
            most[0] = max(most[0], alive[0])
            weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
            return t
        real(directory, specs, tracked)
    monkeypatch.setattr(C, "write_dcp_lazily", counting)
    entry = offline.grow_dcp(src, tmp_path / "out", factor=2, strategy=strategy, seed=3)

    ref, got, got_t = _assert_same_checkpoints(tmp_path / "ref", tmp_path / "out")
    assert got.model.config.d_model == 32
    assert 1 <= most[0] <= 2 < len(got_t)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["growth_history"][-1]["offline"] and entry["params_after"] == got.model.num_params()


def test_offline_growth_refuses_a_file_checkpoint(tmp_path):
    gcfg = GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, d_model=16)
    tcfg = TrainConfig(steps=2, batch_size=2, block_size=16, progress=False)
    model = init_model(gcfg, 0)
    opt = build_optimizer(model, tcfg)
    C.save(tmp_path / "src", model, opt, build_scheduler(opt, tcfg), step=0, train_config=tcfg)
    with pytest.raises(ValueError, match="not a distributed"):
        offline.grow_dcp(tmp_path / "src", tmp_path / "out", factor=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strategy", ["identity", "fresh", "stack"])
def test_offline_depth_growth_writes_what_deepen_and_save_write(tmp_path, strategy):
    """Every tensor, the moment rule's missing state of zeroed and fresh tensors, the
    groups and the scheduler equal those of load + deepen_ + save(storage="dcp"), and
    the result resumes."""
    from growkern import deepen_
    src = _dcp_checkpoint(tmp_path / "src")
    ck = C.load(src)
    deepen_(ck.model, ck.optimizer, ck.scheduler, n_layer=4, strategy=strategy, seed=5)
    C.save(tmp_path / "ref", ck.model, ck.optimizer, ck.scheduler, step=ck.step, train_config=ck.train_config,
           data_state=ck.data, rng=ck.rng, storage="dcp")
    entry = offline.deepen_dcp(src, tmp_path / "out", n_layer=4, strategy=strategy, seed=5)

    ref, got, _ = _assert_same_checkpoints(tmp_path / "ref", tmp_path / "out")
    assert got.model.config.n_layer == 4
    assert entry["params_after"] == got.model.num_params()
    x = torch.randint(0, 61, (2, 16))
    assert torch.equal(got.model(x)[0], ref.model(x)[0])
