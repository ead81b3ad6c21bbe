"""Property-based tests of the boundaries: widen_ / plan_growth over random configs and
arguments, and the command line's argument combinations.

widen_: every call either succeeds with what it promises (logits preserved where the
plan says the growth is exact; the same Parameter objects; optimizer state shaped like
its parameters; optimizer.step() and scheduler.step() then run to finite parameters)
or raises ValueError, TypeError or MemoryError with a message, leaving model, optimizer
and scheduler bit-identical.

CLI: `growkern.cli.main([...])` exits 0 or 2; on failure stderr holds one error line
(`growkern CMD: error: ...`, or argparse's usage + error), never a traceback.

Tests named `test_fix_X_*` pin the fixes (a)-(e) of the "refuse what would lose or waste
work" change (commit d29faf8): (a) grow --out refuses a checkpoint / the source without
--force, (b) --factor 1000's MemoryError is one line with exit 2, (c) a growth that
changes no width is a ValueError, (d) a bad probe_batch is TypeError/ValueError before
anything changes, (e) a non-UTF-8 data file gets an error naming it. Run them with
`-k fix_`. The other single-input tests pin bugs the properties found (fixed since).

Sized from the hypothesis profile (tests/conftest.py): `--hypothesis-profile=fuzz` runs
thousands of fresh examples.
"""
import contextlib
import copy
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from growkern import GPT, GPTConfig, cli, plan_growth, widen_
from growkern.train import data as D
from growkern.growth.strategies import strategies as registered_strategies

N = settings.default.max_examples
REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
needs_real = pytest.mark.skipif(not (REAL / "train.txt").is_file() or not (REAL / "valid.txt").is_file(),
                                reason=f"TinyStories sample not found at {REAL}")
STRATEGIES = registered_strategies()
OK_ERRORS = (ValueError, TypeError, MemoryError)
nan, inf = float("nan"), float("inf")


# --- comparing states bit for bit -----------------------------------------------------

def same(a, b, where="") -> None:
    """Recursive bit-identity of nested dicts/lists/tensors/numbers (NaN equals NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), getattr(b, "keys", None))
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _plain_attrs(model) -> dict:
    """Every plain attribute of every module (Norm eps, Attention n_head, ...): what
    widen_ syncs from the config, so a half-applied growth shows here."""
    out = {}
    for name, mod in model.named_modules():
        for k, v in vars(mod).items():
            if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None))):
                out[f"{name}.{k}"] = v
    return out


def snapshot(model, optimizer, scheduler) -> dict:
    return {
        "config": copy.deepcopy(model.config),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "params": [(n, id(p), tuple(p.shape)) for n, p in model.named_parameters()],
        "attrs": _plain_attrs(model),
        "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        "scheduler": None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
        "scheduler_class": None if scheduler is None else type(scheduler),
    }


def assert_unchanged(before, model, optimizer, scheduler):
    after = snapshot(model, optimizer, scheduler)
    assert after["config"] == before["config"]
    for k in before:
        if k != "config":
            same(before[k], after[k], k)


# --- random models and arguments ---------------------------------------------------------

@st.composite
def configs(draw):
    """Tiny GPTs: GQA or not, both norms, MLPs and position kinds, 1-2 layers."""
    n_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2]))
    hd = draw(st.sampled_from([2, 4]))  # even: rope
    n_head = n_kv * group
    return GPTConfig(
        vocab_size=draw(st.integers(3, 13)), block_size=draw(st.sampled_from([6, 8])),
        n_layer=draw(st.integers(1, 2)), n_head=n_head, n_kv_head=n_kv, d_model=n_head * hd,
        d_ff=draw(st.integers(1, 12)), norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])), pos=draw(st.sampled_from(["learned", "rope"])),
        tie_embeddings=draw(st.booleans()), bias=draw(st.booleans()))


GOOD_FACTORS = st.sampled_from([2, 1.5, 3, 2.5, 1.25, 4, 2.0])
BAD_FACTORS = st.sampled_from([1, 1.0, 1.01, 0.5, 0, -1, -2.0, nan, inf, -inf, "2", b"2", True, False,
                               [2], 2 + 0j, torch.tensor(2.0)])
# Factors of 1e4 and beyond take seconds to plan (perturb's antithetic pairs): tested alone
# in test_huge_factor_is_a_memory_or_value_error.
factors = st.one_of(st.none(), GOOD_FACTORS, GOOD_FACTORS, st.floats(0.5, 4.0), BAD_FACTORS)


def target(draw, current: int, unit: int):
    """A target width: larger (a multiple of `unit` or not), equal, smaller, zero,
    negative, or of the wrong type; None (not given) half of the time."""
    if draw(st.booleans()):
        return None
    return draw(st.one_of(
        st.sampled_from([current * 2, current + unit, current * 3]),
        st.integers(-3, 3 * current + 2),
        st.sampled_from([current, current - unit, 0, -current, float(current * 2), str(current * 2), True,
                         None])))


@st.composite
def strategy_options(draw):
    name = draw(st.one_of(st.sampled_from(STRATEGIES), st.sampled_from(STRATEGIES),
                          st.sampled_from(["nope", "", None, "EXACT_COPY", 3])))
    options = {}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["noise", "preserving", "zero_all", "shrink", "bogus"]))
        options[key] = draw({
            "noise": st.sampled_from([0.0, 0.01, 0.5, -1, nan, inf, "x", None]),
            "preserving": st.sampled_from([True, False, 1, "yes"]),
            "zero_all": st.sampled_from([True, False, 0]),
            "shrink": st.sampled_from([0.0, 0.5, 1.0, 2, -0.1, nan]),
            "bogus": st.just(1),
        }[key])
    return name, options


OPTIMIZERS = ["adamw", "adam_foreach", "adam_fused", "adam_amsgrad", "sgd_momentum", "none",
              "other_model", "missing_param", "extra_param", "duplicate_param", "rmsprop"]
PROBES = ["none", "valid", "valid_pair", "valid_int32", "float", "bool", "out_of_vocab", "negative",
          "string", "too_long", "one_d", "three_d", "empty", "targets_out_of_vocab",
          "targets_wrong_shape", "triple", "list_of_ints", "one_token"]
BAD_PROBES = set(PROBES) - {"none", "valid", "valid_pair", "valid_int32"}


def make_optimizer(kind, model, vocab):
    params = list(model.parameters())
    if kind == "none":
        return None
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    if kind == "adam_foreach":
        return torch.optim.Adam(params, lr=1e-2, foreach=True)
    if kind == "adam_fused":
        return torch.optim.Adam(params, lr=1e-2, fused=True)
    if kind == "adam_amsgrad":
        return torch.optim.Adam(params, lr=1e-2, amsgrad=True)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if kind == "other_model":
        return torch.optim.AdamW(GPT(copy.deepcopy(model.config)).double().parameters(), lr=1e-2)
    if kind == "missing_param":
        return torch.optim.AdamW(params[1:], lr=1e-2)
    if kind == "extra_param":
        return torch.optim.AdamW(params + [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=1e-2)
    if kind == "duplicate_param":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of the duplicate and takes it
            return torch.optim.AdamW(params + params[:1], lr=1e-2)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-2)
    raise AssertionError(kind)


def make_scheduler(kind, optimizer):
    if kind is None or optimizer is None:
        return None
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)


def tokens(vocab, B, T, seed):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def make_probe(kind, cfg: GPTConfig):
    V, T = cfg.vocab_size, cfg.block_size
    x = tokens(V, 2, T, 5)
    return {
        "none": None, "valid": x, "valid_pair": (x[:, :-1], x[:, 1:]), "valid_int32": x.int(),
        "float": x.double(), "bool": x > 0, "out_of_vocab": x + V, "negative": x - V,
        "string": "once upon a time", "too_long": tokens(V, 2, T + 1, 5), "one_d": x[0],
        "three_d": x[None], "empty": x[:, :0], "targets_out_of_vocab": (x, x + V),
        "targets_wrong_shape": (x, x[:, :-1]), "triple": (x, x, x), "list_of_ints": [[1, 2], [0, 1]],
        "one_token": x[:, :1],
    }[kind]


def logits(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)[0]
    model.train(was)
    return out


# --- 1. widen_ over random models, arguments, optimizers and schedulers -------------------

@settings(max_examples=N)
@given(data=st.data())
def test_widen_succeeds_with_its_promises_or_refuses_with_nothing_changed(data):
    draw = data.draw
    cfg = draw(configs(), "config")
    torch.manual_seed(draw(st.integers(0, 3), "init seed"))
    model = GPT(cfg).double()
    hd = cfg.head_dim
    kwargs = {}
    factor = draw(factors, "factor")
    if factor is not None:
        kwargs["factor"] = factor
    for name, current, unit in (("d_model", cfg.d_model, hd), ("d_ff", cfg.d_ff, 1),
                                ("n_head", cfg.n_head, cfg.n_head // cfg.n_kv_head)):
        v = target(draw, current, unit)
        if v is not None:
            kwargs[name] = v
    strategy, options = draw(strategy_options(), "strategy, options")
    kwargs.update(options)
    if strategy != "exact_copy" or draw(st.booleans()):
        kwargs["strategy"] = strategy
    seed = draw(st.sampled_from([None, 0, 1, 2**32 - 1, -1, 2**32, "0", 1.5, True]), "seed")
    if seed is not None:
        kwargs["seed"] = seed
    schedule = draw(st.sampled_from([None, "continue", "rewarm", "rewarm", "nope", 1]), "schedule")
    if schedule is not None:
        kwargs["schedule"] = schedule
    rewarm = draw(st.sampled_from([None, 1, 3, 0, -1, 2.5, "3", True]), "rewarm_steps")
    if rewarm is not None:
        kwargs["rewarm_steps"] = rewarm
    opt_kind = draw(st.sampled_from(OPTIMIZERS), "optimizer")
    sched_kind = draw(st.sampled_from([None, "lambda", "cosine"]), "scheduler")
    steps = draw(st.integers(0, 1), "steps taken")
    probe_kind = draw(st.one_of(st.sampled_from(sorted(set(PROBES) - BAD_PROBES)), st.sampled_from(PROBES)),
                      "probe")

    optimizer = make_optimizer(opt_kind, model, cfg.vocab_size)
    scheduler = make_scheduler(sched_kind, optimizer)
    x = tokens(cfg.vocab_size, 2, cfg.block_size, 1)
    for _ in range(steps):
        model(x[:, :-1], x[:, 1:])[1].backward()  # the gradients stay: widen_ must handle them
        if optimizer is not None:
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    probe = make_probe(probe_kind, cfg)
    before = snapshot(model, optimizer, scheduler)
    logits_before = logits(model, x)
    params_before = list(model.parameters())
    note(f"widen_(model, {opt_kind}, {sched_kind}, probe_batch={probe_kind}, **{kwargs!r})")
    if currently_in_test_context():
        event("widen_ (tried)")

    try:
        report = widen_(model, optimizer, scheduler, probe_batch=probe, **kwargs)
    except OK_ERRORS as e:
        event(f"widen_ refused: {type(e).__name__}")
        assert str(e).strip(), f"{type(e).__name__} without a message"
        assert_unchanged(before, model, optimizer, scheduler)
        return
    event(f"widen_ grew: exact={report.exact}")
    # (d): a bad probe never gets through
    assert probe_kind not in BAD_PROBES, f"widen_ accepted probe_batch={probe_kind}"
    assert opt_kind not in {"other_model", "missing_param", "extra_param", "duplicate_param", "rmsprop"}

    # the same Parameter objects, now shaped as the class builds them from the new config
    assert len(list(model.parameters())) == len(params_before)
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    new = model.config
    old = before["config"]
    with torch.device("meta"):
        ref = GPT(copy.deepcopy(new))
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in ref.named_parameters()}
    if new.tie_embeddings:
        assert model.lm_head.weight is model.wte.weight
    # (c): something grew, nothing shrank
    grew = [(getattr(new, k), getattr(old, k)) for k in ("d_model", "d_ff", "n_head", "n_kv_head")]
    assert all(a >= b for a, b in grew) and any(a > b for a, b in grew), grew
    assert report.dims_after == {k: getattr(new, k) if k != "head_dim" else new.head_dim
                                 for k in report.dims_after}

    after = logits(model, x)
    assert torch.isfinite(after).all()
    if report.exact:
        tol = 1e-9 * max(1.0, float(logits_before.abs().max()))
        assert (after - logits_before).abs().max() <= tol, report
        if report.preservation is not None:
            assert report.preservation["kl_small_wide"] < 1e-12
    if optimizer is not None:
        ids = {id(p) for p in model.parameters()}
        for p, state in optimizer.state.items():
            assert id(p) in ids
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    assert v.shape == p.shape, (k, v.shape, p.shape)
                    assert torch.isfinite(v).all()
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        assert all(torch.isfinite(g["lr"]) if torch.is_tensor(g["lr"]) else math.isfinite(g["lr"])
                   for g in optimizer.param_groups)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


@settings(max_examples=max(5, N // 2))
@given(cfg=configs(), how=st.sampled_from(["factor 1", "factor 1.0", "factor 1.01", "same targets",
                                           "same d_model", "same d_ff", "same n_head"]),
       opt_kind=st.sampled_from(["adamw", "sgd_momentum", "none"]))
def test_fix_c_growth_that_changes_no_width_is_refused_unchanged(cfg, how, opt_kind):
    model = GPT(cfg).double()
    optimizer = make_optimizer(opt_kind, model, cfg.vocab_size)
    scheduler = make_scheduler("cosine", optimizer)
    kwargs = {"factor 1": dict(factor=1), "factor 1.0": dict(factor=1.0), "factor 1.01": dict(factor=1.01),
              "same targets": dict(d_model=cfg.d_model, d_ff=cfg.d_ff, n_head=cfg.n_head),
              "same d_model": dict(d_model=cfg.d_model), "same d_ff": dict(d_ff=cfg.d_ff),
              "same n_head": dict(n_head=cfg.n_head)}[how]
    before = snapshot(model, optimizer, scheduler)
    with pytest.raises(ValueError, match="unchanged"):
        widen_(model, optimizer, scheduler, **kwargs)
    with pytest.raises(ValueError, match="unchanged"):
        plan_growth(cfg, **kwargs)
    assert_unchanged(before, model, optimizer, scheduler)


@settings(max_examples=max(5, N // 2))
@given(cfg=configs(), probe_kind=st.sampled_from(sorted(BAD_PROBES)),
       strategy=st.sampled_from(STRATEGIES), steps=st.integers(0, 1))
def test_fix_d_bad_probe_batch_is_refused_before_anything_changes(cfg, probe_kind, strategy, steps):
    model = GPT(cfg).double()
    optimizer = make_optimizer("adamw", model, cfg.vocab_size)
    scheduler = make_scheduler("lambda", optimizer)
    x = tokens(cfg.vocab_size, 2, cfg.block_size, 1)
    for _ in range(steps):
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer.step()
        scheduler.step()
    before = snapshot(model, optimizer, scheduler)
    with pytest.raises((TypeError, ValueError), match="probe_batch|sequence length|positions"):
        widen_(model, optimizer, scheduler, factor=2, strategy=strategy,
               probe_batch=make_probe(probe_kind, cfg))
    assert_unchanged(before, model, optimizer, scheduler)


@pytest.mark.parametrize("factor", [1e4, 1e18, 2.0**62, 1e300])
def test_huge_factor_is_a_memory_or_value_error(factor):
    """Found by the properties of this file: factor 1e4 passes plan_growth, then widen_'s
    meta build of the new config (adapter.build_reference: nn.Linear allocates its
    weight with torch.empty before it is moved to meta) raises the allocator's
    RuntimeError before _check_memory can say MemoryError; 1e18 and 2**62 make
    plan_growth's DimMap.build raise RuntimeError (storage size overflow), 1e300 a
    TypeError naming torch internals (repeat(): Overflow when unpacking long long)."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=12)
    model = GPT(cfg).double()
    optimizer = torch.optim.AdamW(model.parameters())
    before = snapshot(model, optimizer, None)
    with pytest.raises((MemoryError, ValueError)) as e:
        widen_(model, optimizer, factor=factor)
    assert str(e.value) and "torch" not in str(e.value)
    assert_unchanged(before, model, optimizer, None)


# --- 2. the command line ---------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_cli")


@pytest.fixture(scope="module", autouse=True)
def _cli_env(workdir):
    """One tokenizer cache for the module (so every example reuses the fixture's
    tokenization), and no downloads."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GROWKERN_CACHE", str(workdir / "cache"))
    mp.delenv("GROWKERN_DATA", raising=False)

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    mp.setattr(D, "download", no_network)
    yield
    mp.undo()


# the tiny preset, much smaller still: a checkpoint in a few seconds, a grow in a fraction
TINY = ["--vocab-size", "512", "--block-size", "16", "--batch-size", "2", "--eval-batches", "1",
        "--no-progress", "--n-layer", "1", "--d-model", "16", "--n-head", "2", "--eval-every", "0",
        "--threads", "1"]


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


ERROR_LINE = re.compile(r"^growkern [\w-]+: error: \S")
ARGPARSE_ERROR = re.compile(r"^growkern( [\w-]+)?: error: \S")
WARNING_LINE = re.compile(r"^(growkern( [\w-]+)?: )?warning: ")


def check_cli(argv, rc, out, err):
    """exit 0 or 2; an error is one line on stderr (argparse: usage, then one error line);
    no traceback anywhere."""
    context = f"argv={[str(a) for a in argv]!r}\nrc={rc}\nstdout={out[-2000:]}\nstderr={err[-2000:]}"
    if currently_in_test_context():
        event(f"{argv[0]} exit {rc}")
    assert "Traceback" not in out + err, context
    assert rc in (0, 2), context
    if rc == 0:
        return
    lines = err.rstrip("\n").split("\n")
    if lines[0].startswith("usage:"):
        assert ARGPARSE_ERROR.match(lines[-1]), context
        return
    # warnings announced before the failure are allowed, the error itself is one line
    errors = [line for line in lines if not WARNING_LINE.match(line)]
    assert len(errors) == 1 and ERROR_LINE.match(errors[0]), context


@pytest.fixture(scope="module")
def small_ckpt(workdir):
    if not (REAL / "train.txt").is_file():
        pytest.skip(f"TinyStories sample not found at {REAL}")
    run = workdir / "small"
    rc, out, err = run_cli(["train", "--data", REAL, "--steps", 3, "--out", run, *TINY])
    assert rc == 0, err
    return run


@pytest.fixture(scope="module")
def non_utf8_data(workdir):
    d = workdir / "latin1"
    d.mkdir()
    (d / "train.txt").write_bytes("Once upon a time there was a caf\xe9.\n".encode("latin-1") * 50)
    (d / "valid.txt").write_bytes(b"The end.\n" * 20)
    return d


def tree_digest(path: Path) -> dict:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def fresh_copy(src: Path, where: Path, name: str) -> Path:
    dst = where / name
    shutil.copytree(src, dst)
    return dst


def pick(draw, label, good, bad=()):
    """A value of `good` five times in six, else one of `bad` (shrinking towards good[0])."""
    return draw(st.sampled_from(list(good) * 5 + list(bad)), label)


def add_flags(draw, argv, flags: dict, p_give=3):
    """Each flag of {flag: (good values, bad values)} given with probability 1/p_give
    (shrinking towards not giving it)."""
    for flag, (good, bad) in flags.items():
        if draw(st.integers(0, p_give - 1), f"give {flag}") == p_give - 1:
            argv += [flag] if good is None else [flag, pick(draw, flag, good, bad)]


GOOD_OPTIONS = {"perturb": ["noise=0.05", "preserving=False", "noise=0"], "asym_reset": ["zero_all=True"],
                "szp": ["shrink=0.3"]}
BAD_OPTIONS = ["noise=-1", "noise=x", "noise=nan", "noise=1e400", "noise=[1]", "preserving=1", "shrink=2",
               "bogus=1", "=1", "noeq", "seed=3", "factor=2", "d_model=64", "plan=1", "probe_batch=1",
               "strategy=perturb", "model=1", "backend=fortran", "schedule=rewarm", "zero_all=True"]


@needs_real
@settings(max_examples=N)
@given(data=st.data())
def test_cli_grow_arguments(data, small_ckpt, workdir, non_utf8_data):
    """The checkpoint: d_model 16, 2 heads of 8, d_ff 64."""
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = fresh_copy(small_ckpt, tmp, "src")
        argv = ["grow", pick(draw, "ckpt", [src, src / "ckpt"], [tmp / "missing", tmp, src / "ckpt" / "meta.json"])]
        out_kind = pick(draw, "out", ["new", "nested new", "empty dir"],
                        ["checkpoint", "source", "source ckpt", "a file"])
        out = {"new": tmp / "out", "empty dir": tmp / "empty", "checkpoint": tmp / "other",
               "source": src, "source ckpt": src / "ckpt", "a file": tmp / "file",
               "nested new": tmp / "a" / "b"}[out_kind]
        if out_kind == "empty dir":
            out.mkdir()
        elif out_kind == "checkpoint":
            shutil.copytree(small_ckpt, out)
        elif out_kind == "a file":
            out.write_text("not a checkpoint")
        argv += ["--out", out]
        strategy = pick(draw, "--strategy", STRATEGIES, ["nope", ""])
        argv += ["--strategy", strategy]
        add_flags(draw, argv, {
            "--factor": (["2", "1.5", "3", "2.5", "1.25"], ["1", "0.5", "0", "-1", "nan", "inf", "abc", "1e300"]),
            "--d-model": (["32", "24", "48"], ["16", "8", "0", "-16", "17", "x", "32.0"]),
            "--d-ff": (["128", "100", "65"], ["64", "10", "0", "-1", "1.5"]),
            "--n-head": (["4", "3", "6"], ["2", "1", "0", "-2", "x"]),
            "--schedule": (["continue", "rewarm"], ["bogus"]),
            "--rewarm-steps": (["3", "1"], ["0", "-1", "x"]),
            "--seed": (["0", "1", "4294967295"], ["-1", "4294967296", "x"]),
            "--device": (["cpu", "auto"], []),
            "--data": ([REAL], [tmp / "no-data", non_utf8_data]),
        })
        n_options = draw(st.integers(0, 2), "number of --option")
        for _ in range(n_options):
            argv += ["--option", pick(draw, "--option", GOOD_OPTIONS.get(strategy, BAD_OPTIONS), BAD_OPTIONS)]
        force = draw(st.integers(0, 3), "--force") == 3
        if force:
            argv.append("--force")
        source_before = tree_digest(src)
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        replaced = out_kind == "source" and force
        if rc != 0 or not replaced:
            assert tree_digest(src) == source_before, "the source checkpoint changed"
        # (a): OUT holding a checkpoint (the source's own too) is refused without --force
        if out_kind in ("checkpoint", "source") and not force:
            assert rc == 2
        if out_kind == "source ckpt":  # OUT/ckpt would be inside the source: never
            assert rc == 2 and "inside the checkpoint being grown" in se
        if rc == 0:
            grown = out / "ckpt"
            assert (grown / "meta.json").is_file()
            rc2, so2, se2 = run_cli(["eval", grown, "--batches", "1", "--json"])
            check_cli(["eval", grown], rc2, so2, se2)
            assert rc2 == 0


TRAIN_FLAGS = {
    "--batch-size": (["1", "2"], ["0", "-3"]),
    "--block-size": (["8", "16"], ["0", "-1"]),
    "--lr": (["0.001", "0.01"], ["0", "-1", "nan", "inf", "1e9"]),
    "--min-lr": (["0", "0.0001"], ["-1", "1"]),
    "--warmup": (["0", "1"], ["-1"]),
    "--schedule": (["constant", "cosine", "wsd"], ["bogus"]),
    "--decay-frac": (["0.5", "1"], ["0", "2"]),
    "--weight-decay": (["0.1", "0"], ["-1"]),
    "--grad-clip": (["1", "0"], ["-1", "nan"]),
    "--grad-accum": (["1", "2"], ["0"]),
    "--eval-every": (["1", "0"], ["-1"]),
    "--eval-batches": (["1"], ["0"]),
    "--regime": (["deterministic", "stochastic"], ["random"]),
    "--dropout": (["0"], ["0.1", "1.5"]),
    "--seed": (["0", "3"], ["-1"]),
    "--dtype": (["float32", "bfloat16", "auto"], ["fp16"]),
    "--log-every": (["0", "1"], ["-1"]),
    "--stop-at": (["1", "3", "100"], ["0", "-1"]),
    "--save-every": (["0", "1"], ["-1"]),
    "--threads": (["1"], ["0", "-1"]),
}
MODEL_FLAGS = {
    "--norm": (["layernorm", "rmsnorm"], ["batchnorm"]),
    "--mlp": (["gelu", "swiglu"], ["relu"]),
    "--pos": (["learned", "rope"], ["alibi"]),
    "--n-layer": (["1", "2"], ["0", "-1"]),
    "--d-model": (["8", "16"], ["0", "7"]),
    "--n-head": (["1", "2"], ["3", "0"]),
    "--n-kv-head": (["1"], ["3"]),
    "--d-ff": (["8", "24"], ["0", "-4"]),
    "--vocab-size": (["512"], ["0", "-5"]),
}


@needs_real
@settings(max_examples=max(5, N // 2))
@given(data=st.data())
def test_cli_train_arguments(data, small_ckpt, workdir, non_utf8_data):
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        mode = pick(draw, "mode", ["new", "resume"], ["resume missing", "into checkpoint", "config file"])
        argv = ["train"]
        if mode == "resume":
            argv += ["--resume", fresh_copy(small_ckpt, tmp, "run")]
        elif mode == "resume missing":
            argv += ["--resume", tmp / "missing"]
        else:
            out = tmp / "run"
            if mode == "into checkpoint":
                shutil.copytree(small_ckpt, out)
            argv += ["--out", out, *TINY, "--data", pick(draw, "--data", [REAL], [tmp / "no-data", non_utf8_data])]
            if mode == "config file":
                toml = tmp / "run.toml"
                toml.write_text(pick(draw, "toml", ["[model]\nn_layer = 1\n[train]\nlr = 0.002\n"],
                                     ["[model\nn_layer = \n", "[model]\nn_layerz = 1\n", "[optim]\nlr = 1\n",
                                      "[train]\nsteps = 'x'\n", "[model]\nd_model = 7\n"]))
                argv += ["--config", pick(draw, "--config", [toml], [tmp / "missing.toml", tmp])]
            add_flags(draw, argv, MODEL_FLAGS, p_give=6)
        argv += ["--steps", pick(draw, "--steps", ["1", "2", "4"], ["0", "-1", "x"])]
        add_flags(draw, argv, TRAIN_FLAGS, p_give=6)
        if draw(st.integers(0, 3), "--force") == 3:
            argv.append("--force")
        threads = torch.get_num_threads()
        rc, so, se = run_cli(argv)
        assert torch.get_num_threads() == threads
        check_cli(argv, rc, so, se)
        if mode == "into checkpoint" and "--force" not in argv:
            assert rc == 2
        if mode == "resume missing":
            assert rc == 2


@needs_real
@settings(max_examples=max(5, N // 2))
@given(data=st.data())
def test_cli_eval_and_sample_arguments(data, small_ckpt, workdir, non_utf8_data):
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "file").write_text("x")
        (tmp / "empty").mkdir()
        bad_ckpts = [tmp / "missing", tmp / "file", tmp / "empty", small_ckpt / "metrics.jsonl"]
        ckpt = pick(draw, "ckpt", [small_ckpt, small_ckpt / "ckpt"], bad_ckpts)
        if draw(st.booleans(), "eval"):
            argv = ["eval", ckpt]
            add_flags(draw, argv, {"--batches": (["1", "2"], ["-1", "x"]),  # 0: all, seconds
                                   "--data": ([REAL], [tmp / "no-data", non_utf8_data]),
                                   "--device": (["cpu", "auto"], []), "--json": (None, None)}, p_give=2)
        else:
            argv = ["sample", ckpt, "--tokens", pick(draw, "--tokens", ["0", "1", "5"], ["-1", "x"])]
            add_flags(draw, argv, {"--prompt": (["", "Once", "\u00fcn\u00ef \u2603", "a\tb"], []),
                                   "--temperature": (["0", "0.8", "1e-30"], ["-1", "nan", "inf"]),
                                   "--top-k": (["0", "1", "100000"], []),  # -5: known
                                   "--num": (["0", "1", "2"], ["-1"]),
                                   "--seed": (["0", "7"], ["-1", str(2**70)]),
                                   "--device": (["cpu", "auto"], [])}, p_give=2)
        before = tree_digest(small_ckpt)
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        assert tree_digest(small_ckpt) == before
        if ckpt in bad_ckpts:
            assert rc == 2


# --- the fixes (a), (b), (e) one by one --------------------------------------------------

@needs_real
def test_fix_a_grow_out_refuses_a_checkpoint_or_the_source_without_force(small_ckpt, workdir):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = fresh_copy(small_ckpt, tmp, "src")
        other = fresh_copy(small_ckpt, tmp, "other")
        digest, other_digest = tree_digest(src), tree_digest(other)
        for out in (src, other, src / "ckpt" / ".."):
            argv = ["grow", src, "--factor", "2", "--out", out]
            rc, so, se = run_cli(argv)
            check_cli(argv, rc, so, se)
            assert rc == 2 and "already holds a checkpoint" in se and "--force" in se
        assert tree_digest(src) == digest and tree_digest(other) == other_digest
        argv = ["grow", src, "--factor", "2", "--out", other, "--force"]
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        assert rc == 0 and tree_digest(src) == digest and tree_digest(other) != other_digest


@needs_real
def test_fix_b_grow_factor_1000_is_a_one_line_memory_error(small_ckpt, workdir):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = fresh_copy(small_ckpt, tmp, "src")
        digest = tree_digest(src)
        argv = ["grow", src, "--factor", "1000", "--out", tmp / "wide"]
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        assert rc == 2 and "GiB" in se and not (tmp / "wide" / "ckpt").exists()
        assert tree_digest(src) == digest


@needs_real
@pytest.mark.parametrize("command", ["train", "grow", "eval"])
def test_fix_e_non_utf8_data_file_is_named(command, small_ckpt, workdir, non_utf8_data):
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        if command == "train":
            argv = ["train", "--data", non_utf8_data, "--steps", "1", "--out", tmp / "run", *TINY]
        elif command == "grow":
            argv = ["grow", fresh_copy(small_ckpt, tmp, "src"), "--data", non_utf8_data, "--out", tmp / "w"]
        else:
            argv = ["eval", small_ckpt, "--data", non_utf8_data]
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        assert rc == 2 and "train.txt" in se and "UTF-8" in se


@needs_real
@pytest.mark.parametrize("factor", ["1e4", "1e18"])
def test_grow_huge_factor_is_a_one_line_error(factor, small_ckpt, workdir):
    """Found by the properties of this file: see test_huge_factor_is_a_memory_or_value_error;
    the CLI prints the allocator's RuntimeError as a traceback."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        argv = ["grow", fresh_copy(small_ckpt, tmp, "src"), "--factor", factor, "--out", tmp / "w"]
        try:
            rc, so, se = run_cli(argv)
        except Exception as e:  # a raw exception is what the user sees as a traceback
            pytest.fail(f"{argv}: {type(e).__name__}: {e}")
        check_cli(argv, rc, so, se)
        assert rc == 2


@needs_real
@pytest.mark.parametrize("command", ["train", "demo"])
def test_negative_threads_is_a_one_line_error(command, small_ckpt, workdir):
    """Found by the properties of this file: `--threads -1` reaches torch.set_num_threads in
    cli.main, whose RuntimeError is not caught: a traceback instead of exit 2."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        argv = [command, "--threads", "-1", "--out", tmp / "run", "--data", REAL, "--steps", "2"]
        if command == "train":
            argv += TINY[:-2]  # all but its --threads 1
        try:
            rc, so, se = run_cli(argv)
        except Exception as e:
            pytest.fail(f"{argv}: {type(e).__name__}: {e}")
        check_cli(argv, rc, so, se)
        assert rc == 2


@needs_real
@pytest.mark.parametrize("argv", [
    ["train", "--config", "{tmp}", "--steps", "1", "--data", str(REAL)],  # IsADirectoryError traceback
    ["sample", "{small}", "--tokens", "1", "--top-k", "-5"],  # RuntimeError: selected index k out of range
    ["grow", "{src}", "--factor", "2", "--out", "{src}/ckpt"],  # writes SRC/ckpt/ckpt into the source
])
def test_cli_inputs_that_escape_as_tracebacks_or_touch_the_source(argv, small_ckpt, workdir):
    """Found by the properties above: each is an error to report in one
    line with exit 2, leaving the source checkpoint as it was."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = fresh_copy(small_ckpt, tmp, "src")
        digest = tree_digest(src)
        argv = [a.format(tmp=tmp, small=small_ckpt, src=src) for a in argv]
        try:
            rc, so, se = run_cli(argv)
        except Exception as e:
            pytest.fail(f"{argv}: {type(e).__name__}: {e}")
        check_cli(argv, rc, so, se)
        assert rc == 2 and tree_digest(src) == digest


def test_int32_probe_batch_is_measured_not_a_half_grown_error():
    """Found by the widen_ property: an int32 probe passed the probe check and the
    growth, then nll_loss refused its int32 targets after the model had grown."""
    cfg = GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=1, d_model=2, d_ff=2)
    model = GPT(cfg).double()
    report = widen_(model, factor=2, probe_batch=tokens(5, 2, 6, 0).int())
    assert report.preservation["kl_small_wide"] < 1e-12


# --- 3. `growkern grow` of damaged Hugging Face directories and Trainer checkpoints ------

HF_VOCAB = 64


@pytest.fixture(scope="module")
def hf_sources(workdir):
    """A Llama and a GPT-2 model directory (save_pretrained) and a Trainer checkpoint of a
    Llama run (optimizer.pt, scheduler.pt, trainer_state.json, rng_state.pth, ...)."""
    pytest.importorskip("transformers")
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments)

    class Tokens(torch.utils.data.Dataset):
        x = torch.randint(0, HF_VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=HF_VOCAB, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))

    root = workdir / "hf"
    llama().save_pretrained(root / "llama")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=HF_VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(root / "gpt2")
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2)
    Trainer(model=llama(), args=args, train_dataset=Tokens()).train()
    return {"llama": root / "llama", "gpt2": root / "gpt2", "trainer": root / "run" / "checkpoint-2"}


HF_DAMAGES = ["none", "truncate", "corrupt bytes", "delete", "config value", "weights dtype", "weights lack one",
              "weights extra one", "weights wrong shape", "optimizer dtype", "optimizer wrong shape",
              "optimizer not a state_dict", "scheduler not a state_dict", "trainer_state wrong types"]
# files growkern reads: truncated, each must be refused by name; deleted, the first two
# (a directory without them is no model directory)
MUST_READ = ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def damage_hf(draw, src: Path) -> tuple[str, str]:
    """Damage the copy `src` as drawn; returns (damage, file)."""
    from safetensors.torch import load_file, save_file
    kind = draw(st.sampled_from(HF_DAMAGES), "damage")
    files = sorted(f.name for f in src.iterdir() if f.is_file())
    weights, optimizer = src / "model.safetensors", src / "optimizer.pt"
    if kind in ("truncate", "corrupt bytes", "delete"):
        name = draw(st.sampled_from(files), "file")
        f = src / name
        data = f.read_bytes()
        if kind == "delete":
            f.unlink()
        elif kind == "truncate":
            f.write_bytes(data[:int(len(data) * draw(st.sampled_from([0, 0.1, 0.5, 0.99]), "kept"))])
        else:
            at = int(len(data) * draw(st.sampled_from([0, 0.01, 0.5, 0.9]), "at"))
            f.write_bytes(data[:at] + b"\xff" * 16 + data[at + 16:])
        return kind, name
    if kind == "config value":
        config = json.loads((src / "config.json").read_text())
        key, value = draw(st.sampled_from([
            ("hidden_size", 24), ("n_embd", 24), ("num_attention_heads", 3), ("n_head", 3), ("vocab_size", 7),
            ("model_type", "nope"), ("architectures", ["Nope"]), ("intermediate_size", 3), ("num_hidden_layers", 0),
            ("torch_dtype", "int8"), ("dtype", "bogus"), (None, None)]), "config key")
        (src / "config.json").write_text(json.dumps([config] if key is None else {**config, key: value}))
        return kind, "config.json"
    if kind.startswith("weights"):
        sd = load_file(str(weights))
        name = draw(st.sampled_from(sorted(sd)), "tensor")
        if kind == "weights dtype":
            dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8]))
            sd = {k: v.to(dtype) for k, v in sd.items()}
        elif kind == "weights lack one":
            del sd[name]
        elif kind == "weights extra one":
            sd["extra.weight"] = torch.zeros(3)
        else:
            sd[name] = torch.zeros(*[s + 1 for s in sd[name].shape])
        save_file(sd, str(weights), metadata={"format": "pt"})
        return kind, "model.safetensors"
    if kind.startswith("optimizer") and optimizer.is_file():
        sd = torch.load(optimizer, weights_only=True)
        if kind == "optimizer dtype":
            dtype = draw(st.sampled_from([torch.float16, torch.float64, torch.int64]))
            for state in sd["state"].values():
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    state[k] = state[k].to(dtype)
        elif kind == "optimizer wrong shape":
            state = next(iter(sd["state"].values()))
            state["exp_avg"] = torch.zeros(*[s + 1 for s in state["exp_avg"].shape])
        else:
            sd = [sd]
        torch.save(sd, optimizer)
        return kind, "optimizer.pt"
    if kind == "scheduler not a state_dict" and (src / "scheduler.pt").is_file():
        torch.save([1, 2], src / "scheduler.pt")
        return kind, "scheduler.pt"
    if kind == "trainer_state wrong types" and (src / "trainer_state.json").is_file():
        state = json.loads((src / "trainer_state.json").read_text())
        state.update(draw(st.sampled_from([{"log_history": {}}, {"stateful_callbacks": []}, {"global_step": "x"}])))
        (src / "trainer_state.json").write_text(json.dumps(state))
        return kind, "trainer_state.json"
    return "none", ""


@settings(max_examples=max(5, N // 2))
@given(data=st.data())
def test_cli_grow_of_damaged_hugging_face_sources(data, hf_sources, workdir):
    """Model directories and Trainer checkpoints, whole or damaged (truncated, corrupt,
    missing files, wrong values, dtypes and shapes): `growkern grow` exits 0 with a
    directory that loads, or 2 with one error line (naming the file, for a file that no
    longer reads); never a traceback, never a half-written OUT, never a changed source."""
    from transformers import AutoModelForCausalLM
    draw = data.draw
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        src = fresh_copy(hf_sources[draw(st.sampled_from(sorted(hf_sources)), "source")], tmp, "src")
        damage, name = damage_hf(draw, src)
        note(f"{damage} {name}")
        if currently_in_test_context():
            event(f"damage: {damage}")
        out = tmp / "out"
        argv = ["grow", src, "--out", out, "--strategy", pick(draw, "--strategy", STRATEGIES),
                "--factor", pick(draw, "--factor", ["2", "1.5"], ["1", "0"])]
        source_before = tree_digest(src)
        rc, so, se = run_cli(argv)
        check_cli(argv, rc, so, se)
        assert tree_digest(src) == source_before, "the source changed"
        assert sorted(p.name for p in tmp.iterdir()) == (["out", "src"] if rc == 0 else ["src"]), "OUT half-written"
        if (damage == "truncate" and name in MUST_READ) or (damage == "delete" and name in MUST_READ[:2]):
            assert rc == 2 and name in se, se
        if rc == 0:
            AutoModelForCausalLM.from_pretrained(out)
            if (src / "optimizer.pt").is_file():
                assert isinstance(torch.load(out / "optimizer.pt", weights_only=True), dict)
            if (src / "trainer_state.json").is_file():
                record = json.loads((out / "trainer_state.json").read_text())["log_history"][-1]
                assert record["growth_by"] == "growkern grow"
