"""Data-parallel training and growth under DDP (CPU, gloo, 2 ranks, via tests/multirank.py).

The rank functions are module-level: the harness pickles them by reference and every
rank imports this module again.
"""
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multirank import RankError, run_ranks

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
TIMING = ("dt_ms", "tok_s", "mfu")


# --- the harness ---------------------------------------------------------------

def _sum_ranks(rank, world, extra):
    import torch.distributed as dist
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": float(t), "extra": extra, "threads": torch.get_num_threads()}


def _rank1_raises(rank, world):
    import torch.distributed as dist
    if rank == 1:
        raise KeyError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 waits for rank 1 in a collective: it must not hang the test
    return rank


def _rank0_hangs(rank, world):
    if rank == 0:
        time.sleep(600)
    return rank


def test_harness_returns_each_ranks_result():
    out = run_ranks(_sum_ranks, 2, args=("x",), timeout=60)
    assert [r["rank"] for r in out] == [0, 1]
    assert all(r["sum"] == 3.0 and r["world"] == 2 and r["extra"] == "x" and r["threads"] == 1 for r in out)


def test_harness_reraises_a_failing_rank_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 of 2 raised first") as info:
        run_ranks(_rank1_raises, 2, timeout=60)
    assert time.monotonic() - t0 < 20
    assert "rank 1 broke on purpose" in str(info.value) and "_rank1_raises" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_harness_kills_a_hanging_rank():
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"did not finish within 3 s"):
        run_ranks(_rank0_hangs, 2, timeout=3)
    assert time.monotonic() - t0 < 15


# --- DDP training and growth -------------------------------------------------------

def _tokens(n=20_000, vocab=61, seed=0):
    rng = np.random.default_rng(seed)
    base = np.arange(n) % 17 * 3 % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def _setup(log_path=None, steps=6, grad_accum=1):
    from growkern import GPTConfig
    from growkern.train.loop import TrainConfig, build_optimizer, build_scheduler, init_model, make_batches
    gcfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16)
    tcfg = TrainConfig(steps=steps, batch_size=4, block_size=16, lr=1e-2, min_lr=1e-3, warmup=2,
                       eval_every=3, eval_batches=2, progress=False, log_path=log_path, grad_accum=grad_accum)
    model = init_model(gcfg, 0).double()
    opt = build_optimizer(model, tcfg)
    return model, opt, build_scheduler(opt, tcfg), make_batches(_tokens(), tcfg), tcfg


def _state(model, opt):
    """Parameters and AdamW moments by name, as float64 numpy (picklable, comparable);
    FSDP2's sharded tensors gathered whole (a collective: every rank calls it)."""
    from growkern.growth.placement import local
    named = dict(model.named_parameters())
    out = {n: local(p.detach()).numpy().copy() for n, p in named.items()}
    ids = {id(p): n for n, p in named.items()}
    for p, st in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{ids[id(p)]}/{k}"] = local(st[k].detach()).numpy().copy()
    return out


def _plain_twin(gpt, opt, sched, tcfg):
    """A single-process copy of a (possibly sharded) model with its optimizer and
    scheduler state, gathered whole."""
    from growkern.growth.placement import local
    from growkern.train.loop import build_optimizer, build_scheduler, init_model
    twin = init_model(copy.deepcopy(gpt.config), 0).double()
    named = dict(gpt.named_parameters())
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(local(named[n].detach()))
    twin_opt = build_optimizer(twin, tcfg)
    sd = opt.state_dict()
    sd["state"] = {i: {k: local(v) for k, v in st.items()} for i, st in sd["state"].items()}
    twin_opt.load_state_dict(sd)
    twin_sched = build_scheduler(twin_opt, tcfg)
    twin_sched.load_state_dict(sched.state_dict())
    return twin, twin_opt, twin_sched


def _train_and_grow(rank, world, strategy, log_path=None, grad_accum=1, grow_at=3, end=6, parallel="ddp"):
    """Train to grow_at, widen_ (on the DDP wrapper or the FSDP2 root when world > 1),
    train to end."""
    import growkern
    from growkern.growth.placement import find_ddp, local
    from growkern.train import distributed as D
    from growkern.train.data import eval_batches
    from growkern.train.loop import train
    model, opt, sched, batches, tcfg = _setup(log_path, end, grad_accum)
    ctx = D.context(model)
    if world > 1:
        ctx = D.Context(rank, world, rank, parallel)
        model = D.wrap(model, ctx) if parallel == "ddp" else D.shard_model(model, opt, ctx)
    gpt = find_ddp(model).module if world > 1 and parallel == "ddp" else model
    val = eval_batches(_tokens(seed=1), 16, 4, 2)
    hist = train(model, opt, sched, batches, tcfg, end_step=grow_at if strategy else end, eval_data=val)
    out = {"hist": hist}
    if strategy:
        # the single-process growth of a copy of the same state, to compare bit for bit
        twin, twin_opt, twin_sched = _plain_twin(gpt, opt, sched, tcfg)
        kw = dict(factor=2, strategy=strategy, seed=7, probe_batch=batches.batch(20_000))  # probes: forwards
        grow = growkern.widen_
        if strategy.startswith("depth:"):
            grow, kw = growkern.deepen_, {**kw, "factor": None, "n_layer": 4, "strategy": strategy[6:]}
        twin_report = grow(twin, twin_opt, twin_sched, **kw)
        report = grow(model, opt, sched, **kw)
        out["notes"] = report.notes
        assert report.preservation == pytest.approx(twin_report.preservation, rel=1e-9, abs=1e-12)
        out["grown"], out["twin"] = _state(gpt, opt), _state(twin, twin_opt)
        # one gradient of the global batch's loss through the grown wrapper, then training goes on
        x, y = batches.batch(10_000)
        if world > 1:
            x, y = D.shard(x, ctx), D.shard(y, ctx)
        _, loss = model(x, y)
        loss.backward()
        out["grad"] = {n: local(p.grad).numpy().copy() for n, p in gpt.named_parameters()}
        opt.zero_grad(set_to_none=True)
        out["hist"] += train(model, opt, sched, batches, tcfg, start_step=grow_at, end_step=end, eval_data=val)
    out["final"] = _state(gpt, opt)
    return out


def _records(hist):
    return [{k: v for k, v in r.items() if k not in TIMING + ("parallel", "world_size")} for r in hist]


def _assert_close_records(a, b, rtol=1e-6):
    """Records agree to float32 rounding: train() logs loss and grad_norm as float32
    (DDP: the float32 mean of the ranks' losses); the float64 weights are compared tightly."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra, rb)
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-12), (k, ra, rb)


def _assert_close_states(a, b, atol=1e-10):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        np.testing.assert_allclose(a[n], b[n], rtol=1e-9, atol=atol, err_msg=n)


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape and np.array_equal(a[n], b[n]), n


def test_ddp_training_equals_the_single_process_run(tmp_path):
    """2 ranks x 2 rows = the global batch of 4 of one process (2 micro-batches a step, the
    first under no_sync): the same losses, LRs,
    grad norms and val losses (logged as float32: to 1e-6), the same final float64 weights and
    moments (to 1e-10);
    replicas identical bit for bit; the log written once, by rank 0."""
    log = tmp_path / "metrics.jsonl"
    t0 = time.monotonic()
    ddp = run_ranks(_train_and_grow, 2, args=(None, str(log), 2), timeout=120)
    single, = run_ranks(_train_and_grow, 1, args=(None, None, 2), timeout=120)
    print(f"2 ranks + reference: {time.monotonic() - t0:.1f} s")
    _assert_equal_states(ddp[0]["final"], ddp[1]["final"])
    assert _records(ddp[0]["hist"]) == _records(ddp[1]["hist"])  # every rank sees the same records
    assert all(r["parallel"] == "ddp" and r["world_size"] == 2 for r in ddp[0]["hist"])
    assert all("parallel" not in r for r in single["hist"])  # single-process records as before
    _assert_close_records(_records(ddp[0]["hist"]), _records(single["hist"]))
    assert [r["step"] for r in ddp[0]["hist"] if "val_loss" in r] == [3, 6]
    _assert_close_states(ddp[0]["final"], single["final"])
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert _records(logged) == _records(ddp[0]["hist"])


@pytest.mark.parametrize("strategy", ["exact_copy", "perturb"])
def test_ddp_widen_mid_training_equals_the_single_process_run(strategy):
    """Train 3 steps, widen_ the DDP wrapper on both ranks, train 3 more with the same
    optimizer and scheduler: the wrapper keeps averaging gradients (identical on both
    ranks), the growth is bit for bit the single-process growth of the same state
    (perturb's noise included), and the whole curve equals the single-process run that
    grows at the same step."""
    t0 = time.monotonic()
    ddp = run_ranks(_train_and_grow, 2, args=(strategy,), timeout=120)
    single, = run_ranks(_train_and_grow, 1, args=(strategy,), timeout=120)
    print(f"{strategy}: 2 ranks + reference: {time.monotonic() - t0:.1f} s")
    for r in ddp:
        _assert_equal_states(r["grown"], r["twin"])  # DDP's growth = a single process's
        assert any("new Reducer" in n for n in r["notes"])
    _assert_equal_states(ddp[0]["grown"], ddp[1]["grown"])
    _assert_equal_states(ddp[0]["grad"], ddp[1]["grad"])  # gradients still averaged
    _assert_equal_states(ddp[0]["final"], ddp[1]["final"])
    assert ddp[0]["grown"]["wte.weight"].shape == (61, 32)
    _assert_close_states(ddp[0]["grad"], single["grad"])
    _assert_close_records(_records(ddp[0]["hist"]), _records(single["hist"]))
    _assert_close_states(ddp[0]["final"], single["final"])
    up = ddp[0]["grown"]["blocks.0.mlp.up.weight"]  # (128, 32): rows 64.. copy rows ..63
    assert np.array_equal(up[:64], up[64:]) == (strategy == "exact_copy")  # perturb: noise, same on each rank


@pytest.mark.parametrize("strategy", ["depth:identity", "depth:interleave"])
def test_ddp_deepen_mid_training_equals_the_single_process_run(strategy):
    """deepen_ of the DDP wrapper mid-training: the new blocks' gradients are averaged
    too (identical on both ranks), the growth is the single process's bit for bit, and
    the curve equals the single-process run that grows at the same step."""
    ddp = run_ranks(_train_and_grow, 2, args=(strategy,), timeout=120)
    single, = run_ranks(_train_and_grow, 1, args=(strategy,), timeout=120)
    for r in ddp:
        _assert_equal_states(r["grown"], r["twin"])
        assert any("new Reducer" in n for n in r["notes"])
    assert "blocks.3.attn.o_proj.weight" in ddp[0]["grad"]
    _assert_equal_states(ddp[0]["grad"], ddp[1]["grad"])
    _assert_equal_states(ddp[0]["final"], ddp[1]["final"])
    _assert_close_states(ddp[0]["grad"], single["grad"])
    _assert_close_records(_records(ddp[0]["hist"]), _records(single["hist"]))
    _assert_close_states(ddp[0]["final"], single["final"])


def _grow_inner_module(rank, world):
    """widen_(ddp.module), as a Trainer callback does, grows through the DDP wrapper
    the user made; without that the old Reducer would silently stop averaging gradients."""
    import growkern
    from torch.nn.parallel import DistributedDataParallel
    model, opt, sched, batches, tcfg = _setup()
    ddp = DistributedDataParallel(model)
    growkern.widen_(ddp.module, opt, sched, factor=2, strategy="perturb", seed=3)
    x, y = batches.batch(rank)  # different data on each rank
    _, loss = ddp(x, y)
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


def test_widen_of_the_inner_module_grows_through_its_ddp_wrapper():
    a, b = run_ranks(_grow_inner_module, 2, timeout=120)
    _assert_equal_states(a, b)


def _refuse_builtin_hook(rank, world, depth=False):
    import torch.distributed as dist
    import growkern
    from growkern.train import distributed as D
    model, opt, sched, _, _ = _setup()
    ddp = D.wrap(model, D.Context(rank, world, rank, "ddp"))
    ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        if depth:
            growkern.deepen_(ddp, opt, sched, n_layer=4)
        else:
            growkern.widen_(ddp, opt, sched, factor=2)
    except ValueError as e:
        same = all(torch.equal(before[n], p) for n, p in model.named_parameters()) and \
            len(model.blocks) == 2 and sum(len(g["params"]) for g in opt.param_groups) == len(before)
        return str(e), same, ddp.reducer is not None
    return None


@pytest.mark.parametrize("depth", [False, True], ids=["widen_", "deepen_"])
def test_growth_refuses_a_ddp_it_cannot_rebuild_and_changes_nothing(depth):
    for msg, same, has_reducer in run_ranks(_refuse_builtin_hook, 2, args=(depth,), timeout=120):
        assert "built-in comm hook" in msg and msg.startswith("deepen_" if depth else "widen_")
        assert same and has_reducer


# --- torchrun end to end -----------------------------------------------------------

def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "GROWKERN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("GROWKERN_DATA", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc else [sys.executable])
    r = subprocess.run(launcher + ["-m", "growkern", *args], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.skipif(not (REAL / "train.txt").is_file(), reason=f"TinyStories sample not found at {REAL}")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_train_smoke(tmp_path, parallel):
    """`torchrun --standalone --nproc_per_node 2 -m growkern train [--fsdp]` on the real
    data: each step logged once, by rank 0, with parallel/world_size; the distributed
    checkpoint (each rank its shards) loads in a single process and says how it was
    trained. FSDP2 also: `growkern grow` of that checkpoint offline, in one process,
    writes a distributed checkpoint of the new width, which `train --resume --fsdp`
    continues under torchrun."""
    from growkern.train import checkpoint as C
    out = tmp_path / "run"
    flags = ["--fsdp"] if parallel == "fsdp" else []
    t0 = time.monotonic()
    stdout = _torchrun(["train", "--preset", "tiny", "--data", str(REAL), "--steps", "4", "--batch-size", "4",
                        "--block-size", "32", "--vocab-size", "512", "--n-layer", "1", "--d-model", "32",
                        "--eval-every", "2", "--eval-batches", "1", "--save-every", "2", "--threads", "1",
                        "--out", str(out), *flags], tmp_path)
    print(f"torchrun smoke ({parallel}): {time.monotonic() - t0:.1f} s")
    assert stdout.count(f"({parallel.upper() if parallel == 'ddp' else 'FSDP2'}) on 2 processes") == 1  # rank 0 only
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all(x["parallel"] == parallel and x["world_size"] == 2 for x in recs)
    assert [x["step"] for x in recs if "val_loss" in x] == [2, 4]
    ck = C.load(out)
    assert ck.step == 4 and ck.meta["parallel"] == parallel and ck.meta["world_size"] == 2
    assert ck.meta["storage"] == "dcp"
    assert ck.data["step"] == 4  # the global data cursor: one global batch per step
    if parallel == "ddp":
        return
    grown = tmp_path / "grown"
    _torchrun(["grow", str(out), "--out", str(grown), "--factor", "2", "--strategy", "perturb",
               "--data", str(REAL)], tmp_path, nproc=0)
    g = C.load(grown)
    assert g.meta["storage"] == "dcp" and g.model.config.d_model == 64 and g.step == 4
    # then deeper, offline as well: the FSDP2 run's way to grow in depth (docs/distributed.md)
    deep = tmp_path / "deep"
    _torchrun(["grow", str(grown), "--out", str(deep), "--n-layer", "2"], tmp_path, nproc=0)
    stdout = _torchrun(["train", "--resume", str(deep), "--fsdp", "--steps", "6", "--threads", "1",
                        "--data", str(REAL)], tmp_path)
    assert stdout.count("each rank read its shards") == 1  # straight into the shards (load_sharded)
    recs = [json.loads(line) for line in (deep / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [5, 6] and all(np.isfinite(x["loss"]) for x in recs)
    done = C.load(deep)
    assert done.step == 6 and done.model.config.d_model == 64 and done.meta["parallel"] == "fsdp"
    assert done.model.config.n_layer == 2 and [e.get("operation", "widen_") for e in done.growth_history] == \
        ["widen_", "deepen_"]


# --- FSDP2 ---------------------------------------------------------------------------

def test_fsdp_training_equals_the_single_process_run():
    """fully_shard per block and root, 2 ranks x 2 rows, 2 micro-batches a step (the
    first without gradient sync): the single process's losses, grad norms and val
    losses (float32 logs: 1e-6) and its final float64 weights and moments."""
    fsdp = run_ranks(_train_and_grow, 2, args=(None, None, 2), kwargs={"parallel": "fsdp"}, timeout=120)
    single, = run_ranks(_train_and_grow, 1, args=(None, None, 2), timeout=120)
    _assert_equal_states(fsdp[0]["final"], fsdp[1]["final"])
    assert all(r["parallel"] == "fsdp" and r["world_size"] == 2 for r in fsdp[0]["hist"])
    _assert_close_records(_records(fsdp[0]["hist"]), _records(single["hist"]))
    _assert_close_states(fsdp[0]["final"], single["final"])


@pytest.mark.parametrize("strategy", ["exact_copy", "perturb"])
def test_fsdp_widen_mid_training_equals_the_single_process_run(strategy):
    """widen_ of the FSDP2 root on both ranks, each building only its rows: the gathered
    grown state is bit for bit the single-process growth of the same state (perturb's
    noise keyed by the global row), gradients flow into the grown shards, and the
    curve equals the single-process run that grows at the same step."""
    fsdp = run_ranks(_train_and_grow, 2, args=(strategy,), kwargs={"parallel": "fsdp"}, timeout=120)
    single, = run_ranks(_train_and_grow, 1, args=(strategy,), timeout=120)
    for r in fsdp:
        _assert_equal_states(r["grown"], r["twin"])
        assert any("FSDP2" in n for n in r["notes"])
    _assert_equal_states(fsdp[0]["grad"], fsdp[1]["grad"])
    assert fsdp[0]["grown"]["wte.weight"].shape == (61, 32)
    _assert_close_states(fsdp[0]["grad"], single["grad"])
    _assert_close_records(_records(fsdp[0]["hist"]), _records(single["hist"]))
    _assert_close_states(fsdp[0]["final"], single["final"])


def _fsdp_growth_peak(rank, world):
    """The largest tensor any op makes during an FSDP2 widen_ (every op's outputs on a
    real device: the all-gathered old tensors, this rank's new rows, the maps, the
    reference builds' buffers), against the largest full new parameter."""
    import growkern
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from growkern.train import distributed as D
    from growkern.train.loop import train
    model, opt, sched, batches, tcfg = _setup(None, 1)
    model = D.shard_model(model, opt, D.Context(rank, world, rank, "fsdp"))
    train(model, opt, sched, batches, tcfg)  # one step: the moments exist
    old_max = max(p.numel() for p in model.parameters())

    class Largest(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                # a DTensor holds no storage of its global size: its local tensor is seen on its own
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and not isinstance(t, DTensor):
                    Largest.seen = max(Largest.seen, t.numel())
            return out

    with Largest():
        growkern.widen_(model, opt, sched, factor=2, strategy="perturb", seed=1)
    new_full = max(p.numel() for p in model.parameters())
    new_shard = max(p.to_local().numel() for p in model.parameters())
    return Largest.seen, old_max, new_shard, new_full


def test_fsdp_growth_never_builds_a_whole_new_parameter():
    for seen, old_max, new_shard, new_full in run_ranks(_fsdp_growth_peak, 2, timeout=120):
        assert new_shard < new_full and old_max < new_full
        assert seen <= max(old_max, new_shard) < new_full, (seen, old_max, new_shard, new_full)


# --- distributed checkpoints ----------------------------------------------------------

def _dcp_run(rank, world, ckdir, mode, save_at=3, end=6):
    """mode "save": train to save_at, checkpoint (torch.distributed.checkpoint), train to
    end; mode "resume": load the checkpoint, train to end. FSDP2 when world > 1. Returns
    the final state, gathered whole."""
    from growkern.train import checkpoint as C
    from growkern.train import distributed as D
    from growkern.train.loop import train
    ctx = D.Context(rank, world, rank, "fsdp") if world > 1 else D.SINGLE
    if mode == "save":
        model, opt, sched, batches, tcfg = _setup(None, end)
        model = model.float()
    elif mode == "resume-sharded":  # straight into the shards: each rank reads what it holds
        ck = C.load_sharded(ckdir, ctx, torch.device("cpu"))
        model, opt, sched, tcfg = ck.model, ck.optimizer, ck.scheduler, ck.train_config
        batches = ck.batches(_tokens())
    else:
        ck = C.load(ckdir)
        model, opt, sched, tcfg = ck.model, ck.optimizer, ck.scheduler, ck.train_config
        batches = ck.batches(_tokens())
    if world > 1 and mode != "resume-sharded":
        model = D.shard_model(model, opt, ctx)
    if mode == "save":
        train(model, opt, sched, batches, tcfg, end_step=save_at)
        C.save(ckdir, model, opt, sched, step=save_at, train_config=tcfg, batches=batches, storage="dcp")
    hist = train(model, opt, sched, batches, tcfg, start_step=save_at, end_step=end)
    return {"final": _state(model, opt), "hist": hist}


@pytest.mark.parametrize("saved_on, resumed_on, how", [(2, 1, "resume"), (1, 2, "resume"),
                                                        (1, 2, "resume-sharded"), (2, 2, "resume-sharded")])
def test_dcp_checkpoint_resumes_on_another_world_size(tmp_path, saved_on, resumed_on, how):
    """A checkpoint written with torch.distributed.checkpoint (by 2 FSDP2 ranks, each its
    shards, or by one process) resumes on 1 or 2 ranks, loaded whole then sharded, or
    read straight into the shards (load_sharded), with the continuation of the run that
    wrote it (float32: reduction order differs across world sizes)."""
    from growkern.train import checkpoint as C
    ck = tmp_path / "ckpt"
    wrote = run_ranks(_dcp_run, saved_on, args=(str(ck), "save"), timeout=120)[0]
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["storage"] == "dcp" and meta["step"] == 3
    assert any(name.startswith("dcp/") and name.endswith(".distcp") for name in meta["files"])
    if saved_on == 2:
        assert meta["parallel"] == "fsdp" and meta["world_size"] == 2
        assert sum(name.endswith(".distcp") for name in meta["files"]) == 2  # each rank its shards
    resumed = run_ranks(_dcp_run, resumed_on, args=(str(ck), how), timeout=120)[0]
    _assert_close_records(_records(resumed["hist"]), _records(wrote["hist"]), rtol=2e-5)
    assert resumed["final"].keys() == wrote["final"].keys()
    for n in wrote["final"]:
        np.testing.assert_allclose(resumed["final"][n], wrote["final"][n], rtol=1e-4, atol=1e-6, err_msg=n)
    assert C.load(ck).step == 3  # and it loads in this (single) process


def _dcp_save_then_die(rank, world, ckdir):
    """Save at step 1 (complete), then rank 1 dies in the middle of the save at step 2."""
    import signal
    from growkern.train import checkpoint as C
    from growkern.train import distributed as D
    from growkern.train.loop import train
    model, opt, sched, batches, tcfg = _setup(None, 2)
    model = D.shard_model(model.float(), opt, D.Context(rank, world, rank, "fsdp"))
    train(model, opt, sched, batches, tcfg, end_step=1)
    C.save(ckdir, model, opt, sched, step=1, train_config=tcfg, batches=batches)
    train(model, opt, sched, batches, tcfg, start_step=1, end_step=2)
    if rank == 1:
        real = C._write_dcp

        def write_then_die(*args, **kwargs):
            time.sleep(0.5)  # rank 0 is inside its save by now, waiting for this one
            os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kwargs)
        C._write_dcp = write_then_die
    C.save(ckdir, model, opt, sched, step=2, train_config=tcfg, batches=batches)
    return "saved"


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL one rank in the middle of a distributed save: the checkpoint before it
    stays complete and loadable; the half-written staging directory is never swapped in
    and the next load (or save) of that checkpoint removes it."""
    from growkern.train import checkpoint as C
    ck = tmp_path / "ckpt"
    with pytest.raises(RankError, match="rank 1"):
        run_ranks(_dcp_save_then_die, 2, args=(str(ck),), timeout=60)
    staged = [p for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(staged) == 1 and (staged[0] / "dcp").is_dir()  # the killed save's, never swapped in
    loaded = C.load(ck)  # verifies every file's sha256; removes what the killed save left
    assert loaded.step == 1 and loaded.meta["storage"] == "dcp"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# --- FSDP2 growth of Hugging Face models ----------------------------------------------

def _hf_fsdp_grow(rank, world, family):
    """A tiny transformers model after one AdamW step, sharded with FSDP2 (or, with one
    rank, not), grown x2 with perturb, then one more step on the global batch."""
    import transformers as T
    import growkern
    from growkern.train import distributed as D
    if family == "llama":  # GQA, untied, biases: rows split under row_offset
        cls, cfg = T.LlamaForCausalLM, T.LlamaConfig(
            vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attention_bias=True)
    else:  # transposed Conv1D (sharded rows are the plan's columns), fused c_attn, tied head
        cls, cfg = T.GPT2LMHeadModel, T.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(3, 61, (4, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ctx = D.Context(rank, world, rank, "fsdp")
    if world > 1:
        model = D.shard_model(model, opt, ctx)
    growkern.widen_(model, opt, factor=2, strategy="perturb", seed=5)
    grown = _state(model, opt)
    rows = D.shard(x, ctx) if world > 1 else x
    model(input_ids=rows, labels=rows).loss.backward()  # each rank's 2 rows of 9 tokens: mean of means
    opt.step()
    return {"grown": grown, "stepped": _state(model, opt), "d": model.config.to_dict()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fsdp_growth_of_hugging_face_models_equals_the_single_process(family):
    """transformers' Llama and GPT-2 under fully_shard: widen_ on 2 ranks gives, gathered,
    the single-process growth bit for bit (GPT-2's Conv1D weights are stored transposed,
    so a rank's rows are the plan's columns), and the next AdamW step on the sharded,
    grown model equals the single process's."""
    fsdp = run_ranks(_hf_fsdp_grow, 2, args=(family,), timeout=120)
    single, = run_ranks(_hf_fsdp_grow, 1, args=(family,), timeout=120)
    for r in fsdp:
        _assert_equal_states(r["grown"], single["grown"])
        assert r["d"] == single["d"]
    _assert_equal_states(fsdp[0]["stepped"], fsdp[1]["stepped"])
    _assert_close_states(fsdp[0]["stepped"], single["stepped"])


def _stochastic_run(rank, world, ckdir, mode):
    """DDP in the stochastic regime (dropout 0.1, each rank its own masks): "save" trains
    2 steps, saves, trains 2 more; "resume" loads, restores this rank's RNG, trains 2."""
    from growkern.growth.placement import find_ddp
    from growkern.train import checkpoint as C
    from growkern.train import distributed as D
    from growkern.train.loop import seed_everything, train
    ctx = D.Context(rank, world, rank, "ddp")
    if mode == "save":
        model, opt, sched, batches, tcfg = _setup(None, 4)
        model = model.float()  # as checkpoints load
        tcfg = tcfg.replace(regime="stochastic", dropout=0.1)
        seed_everything(0)
        D.decorrelate_rng(ctx)
    else:
        ck = C.load(ckdir)
        model, opt, sched, tcfg = ck.model, ck.optimizer, ck.scheduler, ck.train_config
        batches = ck.batches(_tokens())
        assert ck.restore_rng_of(rank, world)
    model = D.wrap(model, ctx)
    if mode == "save":
        train(model, opt, sched, batches, tcfg, end_step=2)
        C.save(ckdir, model, opt, sched, step=2, train_config=tcfg, batches=batches)
    train(model, opt, sched, batches, tcfg, start_step=2, end_step=4)
    return _state(find_ddp(model).module, opt)


def test_a_stochastic_distributed_run_resumes_bit_for_bit(tmp_path):
    """Each rank's RNG state is in the distributed checkpoint; resumed on as many ranks,
    every rank continues its own dropout stream: the same weights and moments, bit for bit."""
    ck = tmp_path / "ckpt"
    wrote = run_ranks(_stochastic_run, 2, args=(str(ck), "save"), timeout=120)
    resumed = run_ranks(_stochastic_run, 2, args=(str(ck), "resume"), timeout=120)
    for a, b in zip(wrote, resumed):
        _assert_equal_states(a, b)
    assert not np.array_equal(wrote[0]["wte.weight"], _plain_state_without_dropout(tmp_path))


def _plain_state_without_dropout(tmp_path):
    """The same model and data without dropout (so the test above is not vacuous)."""
    model, opt, sched, batches, tcfg = _setup(None, 4)
    from growkern.train.loop import train
    model = model.float()
    train(model, opt, sched, batches, tcfg)
    return model.wte.weight.detach().numpy()


def _fsdp_mixed_precision(rank, world):
    import torch
    from growkern.growth.placement import fsdp_params
    from growkern.train import distributed as D
    from growkern.train.loop import train
    model, opt, sched, batches, tcfg = _setup(None, 4)
    model = model.float()  # the same Parameter objects, in float32
    if world > 1:
        model = D.shard_model(model, opt, D.Context(rank, world, rank, "fsdp"), param_dtype=torch.bfloat16)
    hist = train(model, opt, sched, batches, tcfg)
    reduce = {fp.reduce_dtype for fp in fsdp_params(model).values()}  # None: the compute dtype
    return [r["loss"] for r in hist], {p.dtype for p in model.parameters()}, reduce


def test_fsdp_mixed_precision_computes_in_bfloat16_and_keeps_float32_weights():
    """--fsdp-param-dtype bfloat16: forward and backward in bfloat16 (the losses differ
    a little from float32's), weights, optimizer and gradient reduction in float32."""
    (mp_loss, dtypes, reduce), _ = run_ranks(_fsdp_mixed_precision, 2, timeout=120)
    (fp_loss, _, _), = run_ranks(_fsdp_mixed_precision, 1, timeout=120)
    assert dtypes == {torch.float32} and reduce == {torch.float32}  # gradients reduced in float32
    np.testing.assert_allclose(mp_loss, fp_loss, rtol=3e-2)  # bfloat16 compute: close, not equal
    assert mp_loss != fp_loss


def _fsdp_refusal(rank, world):
    """A growth FSDP2 sharding cannot do is refused before anything changes."""
    import growkern
    from growkern.train import distributed as D
    from growkern.train.loop import train
    model, opt, sched, batches, tcfg = _setup(None, 1)
    model = D.shard_model(model, opt, D.Context(rank, world, rank, "fsdp"))
    train(model, opt, sched, batches, tcfg)
    before = _state(model, opt)
    lr = [g["lr"] for g in opt.param_groups]
    try:
        growkern.widen_(model, opt, sched, factor=2, strategy="structured")
    except ValueError as e:
        return str(e), before, _state(model, opt), lr == [g["lr"] for g in opt.param_groups]
    return None


def test_fsdp_refuses_what_it_cannot_shard_and_changes_nothing():
    for msg, before, after, same_lr in run_ranks(_fsdp_refusal, 2, timeout=120):
        assert "orthogonalize" in msg and same_lr
        _assert_equal_states(before, after)


def _trainer_ddp_growth(rank, world, out):
    """transformers' Trainer under DDP (gloo) with a GrowthCallback at step 3: returns the
    final weights and the dataset indices this rank was served."""
    import transformers as T

    from growkern.hf import GrowthCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randint(0, 61, (32, 8), generator=torch.Generator().manual_seed(0))
            self.served = set()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            self.served.add(int(i))
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = T.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, report_to=[],
                               use_cpu=True, disable_tqdm=True, save_strategy="no", ddp_backend="gloo",
                               logging_steps=100)
    data = Tokens()
    grow = GrowthCallback(at_step=3, factor=2, strategy="perturb", seed=1)
    trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[grow])
    trainer.train()
    return {"world": args.world_size, "wrapper": type(trainer.model_wrapped).__name__, "grown_at": grow.grown_at,
            "hidden": model.config.hidden_size, "served": sorted(data.served),
            "weights": {n: p.detach().numpy().copy() for n, p in model.named_parameters()}}


def test_trainer_ddp_run_grows_every_replica_and_keeps_averaging(tmp_path):
    """A Trainer DDP run (2 ranks, each its own batches) with GrowthCallback: both replicas
    grow at step 3 and train 3 more steps; their weights stay identical, which they would
    not if DDP had stopped averaging the grown gradients."""
    r0, r1 = run_ranks(_trainer_ddp_growth, 2, args=(tmp_path,), timeout=180)
    for r in (r0, r1):
        assert (r["world"], r["wrapper"], r["grown_at"], r["hidden"]) == (2, "DistributedDataParallel", 3, 32)
    assert not set(r0["served"]) & set(r1["served"])  # different data on each rank
    assert r0["weights"]["model.embed_tokens.weight"].shape == (61, 32)
    for name, w in r0["weights"].items():
        np.testing.assert_array_equal(w, r1["weights"][name], err_msg=name)
