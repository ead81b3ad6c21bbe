"""Warm-start selection (growkern.select_warm_start, `growkern select`): the ranking is
what running each candidate by hand with widen_ and the same steps gives; apply=True
leaves the winner grown in place, apply=False leaves everything bit-identical; the CLI
writes a checkpoint that resumes, and refuses bad input with nothing written."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import growkern
from growkern import GPT, GPTConfig, widen_
from growkern import cli
from growkern.selection import Selection
from growkern.train import checkpoint as C
from growkern.train import data as D

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
needs_real = pytest.mark.skipif(not (REAL / "train.txt").is_file(), reason=f"TinyStories sample not found at {REAL}")
V = 53


def batches_of(n, seed, vocab=V, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (b, t + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def trained_gpt(dropout=0.0):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, d_model=12, dropout=dropout))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8) * 0.99 ** s)
    for x, y in batches_of(6, 99):
        model(x, y)[1].backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def state_of(model, opt, sched):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()),
            copy.deepcopy(vars(model.config)))


def same_state(a, b) -> bool:
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return eq(a, b)


def by_hand(model, opt, sched, strategy, seed, batches, evals, steps, probe):
    """One candidate as a user would run it: widen_, then the plain loop, in eval mode."""
    model, opt, sched = copy_triple(model, opt, sched)
    widen_(model, opt, sched, strategy=strategy, seed=seed, factor=2)
    model.eval()
    losses = {}
    for i, (x, y) in enumerate(batches[:steps], start=1):
        F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i in (probe, steps):
            with torch.no_grad():
                losses[i] = sum(float(F.cross_entropy(model(a)[0].flatten(0, 1), b.flatten())) for a, b in evals) \
                    / len(evals)
    return losses[probe], losses[steps], model


def copy_triple(model, opt, sched):
    m = copy.deepcopy(model)
    o = torch.optim.AdamW(m.parameters(), lr=opt.defaults["lr"])
    s = torch.optim.lr_scheduler.LambdaLR(o, sched.lr_lambdas[0])  # sets the LR to step 0's: load after it
    o.load_state_dict(copy.deepcopy(opt.state_dict()))  # AdamW keeps `step` tensors as given
    s.load_state_dict(sched.state_dict())
    return m, o, s


def test_ranking_is_what_widen_and_the_same_steps_give():
    model, opt, sched = trained_gpt()
    batches, evals = batches_of(10, 1), batches_of(2, 2)
    before = state_of(model, opt, sched)
    ref = {s: by_hand(model, opt, sched, s, 0, batches, evals, 6, 2) for s in ("exact_copy", "structured", "szp")}
    sel = growkern.select_warm_start(model, opt, sched, batches=batches, eval_batches=evals, factor=2,
                                     candidates=["exact_copy", "structured", "szp"], budget=6, probe_steps=2,
                                     apply=False)
    assert same_state(before, state_of(model, opt, sched))  # apply=False: bit-identical
    assert model.config.d_model == 12 and opt.state[model.lm_head.weight]["exp_avg"].shape[1] == 12
    for r in sel.rows:
        probe, final, _ = ref[r["candidate"]]
        assert math.isclose(r["probe_loss"], probe, rel_tol=1e-6) and math.isclose(r["final_loss"], final, rel_tol=1e-6)
    assert sel.best == min(ref, key=lambda s: ref[s][1])
    assert [r["rank"] for r in sel.rows] == [1, 2, 3] and sel.rows[0]["candidate"] == sel.best


def test_apply_leaves_the_winner_grown_in_place():
    model, opt, sched = trained_gpt()
    batches, evals = batches_of(8, 3), batches_of(2, 4)
    ids = [id(p) for p in model.parameters()]
    sel = growkern.select_warm_start(model, opt, sched, batches=batches, eval_batches=evals, d_model=24,
                                     candidates=["structured", "exact_copy"], budget=4, probe_steps=2, seed=5)
    assert [id(p) for p in model.parameters()] == ids and model.config.d_model == 24
    ref, ropt, rsched = trained_gpt()
    widen_(ref, ropt, rsched, strategy=sel.best, seed=5, d_model=24)
    assert same_state(state_of(ref, ropt, rsched), state_of(model, opt, sched))
    assert sel.growth is not None and sel.growth.dims_after["d_model"] == 24


def test_repeats_give_intervals_and_ties_are_ties():
    model, opt, sched = trained_gpt(dropout=0.1)
    sel = growkern.select_warm_start(model, opt, sched, batches=batches_of(7, 5), eval_batches=batches_of(1, 6),
                                     candidates=["exact_copy", "perturb", "asym_reset"], budget=3, probe_steps=1,
                                     repeats=3, regime="stochastic", apply=False)
    assert {len([r for r in sel.runs if r["candidate"] == c]) for c in ("exact_copy", "perturb")} == {3}
    assert {r["growth_seed"] for r in sel.runs} == {0, 1, 2}
    others = [r for r in sel.rows if r["status"] != "best"]
    assert all(not math.isnan(r["diff_lo"]) and r["diff_lo"] <= r["diff_to_best"] <= r["diff_hi"] for r in others
               if not r["status"].startswith("tie"))
    text = sel.report()
    assert "Continue from" in text and "How far a probe-only ranking can be trusted" in text


def test_selection_ties_and_order():
    def run(c, rep, final):
        return dict(candidate=c, strategy=c, repeat=rep, final_loss=final, probe_loss=final, loss_step0=1.0,
                    loss_small=1.0, pres_kl=0.0, escape=0.0, seconds=1.0, train_losses=[1.0])
    runs = [run("exact_copy", 0, 2.0), run("perturb", 0, 2.0 - 3e-6), run("structured", 0, 2.1)]
    sel = Selection.from_runs(runs, ["exact_copy", "perturb", "structured"], metric="final_loss", tol=1e-5)
    assert sel.best == "exact_copy"  # within the tolerance: the first listed
    status = {r["candidate"]: r["status"] for r in sel.rows}
    assert status["perturb"].startswith("tie") and status["structured"].startswith("behind")
    sel = Selection.from_runs(runs, ["exact_copy", "perturb", "structured"], metric="final_loss", tol=0.0)
    assert sel.best == "perturb"


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=["nope"]), "unknown candidate strategy 'nope'"),
    (dict(budget=20), "cannot feed 20 steps"),
    (dict(budget=4, probe_steps=5), "probe_steps 5 is beyond the budget 4"),
    (dict(regime="noisy"), "unknown regime 'noisy'"),
    (dict(d_model=7), "d_model"),
    (dict(eval_batches=[]), "eval_batches is empty"),
])
def test_bad_input_changes_nothing(kwargs, match):
    model, opt, sched = trained_gpt()
    before = state_of(model, opt, sched)
    args = dict(batches=batches_of(6, 1), eval_batches=batches_of(1, 2), budget=4, probe_steps=2)
    with pytest.raises((ValueError, TypeError), match=match):
        growkern.select_warm_start(model, opt, sched, **{**args, **kwargs})
    assert same_state(before, state_of(model, opt, sched))


def test_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in batches_of(3, 7):
        F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(cfg.to_dict()))
    kw = dict(batches=batches_of(4, 8), eval_batches=batches_of(1, 9), budget=3, probe_steps=1,
              candidates=["exact_copy", "asym_reset"])
    sel = growkern.select_warm_start(model, opt, apply=False, **kw)
    assert same_state(before, (model.state_dict(), opt.state_dict(), model.config.to_dict()))
    assert all(abs(r["dloss_step0"]) < 1e-5 for r in sel.rows)  # both preserve the function at step 0
    sel = growkern.select_warm_start(model, opt, **kw)
    assert model.config.hidden_size == 32 and model.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    x = batches_of(1, 10)[0][0][:1, :5]
    out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


# --- command line ----------------------------------------------------------------------

FAST = ["--vocab-size", "512", "--batch-size", "4", "--block-size", "32", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("select") / "small"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GROWKERN_CACHE", str(path.parent / "cache"))
        assert cli.main(["train", "--preset", "tiny", "--data", str(REAL), "--steps", "20", "--stop-at", "6",
                         "--out", str(path), *FAST]) == 0
    return path


@needs_real
def test_cli_writes_a_checkpoint_that_resumes(small_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GROWKERN_CACHE", str(small_run.parent / "cache"))
    out = tmp_path / "sel"
    rc = cli.main(["select", str(small_run), "--out", str(out), "--candidates", "exact_copy,structured",
                   "--budget", "3", "--probe-steps", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "selecting among 2 candidates x 1 repeat(s) x 3 steps" in text and "FLOPs" in text
    assert {p.name for p in out.iterdir()} >= {"ranking.md", "ranking.csv", "ckpt"}
    ck = C.load(out)
    assert ck.gpt_config.d_model == 128 and ck.step == 6
    assert ck.growth_history[-1]["selection"]["best"] in ("exact_copy", "structured")
    assert cli.main(["train", "--resume", str(out), "--steps", "8", "--no-progress"]) == 0
    assert C.load(out).step == 8


@needs_real
@pytest.mark.parametrize("args, match", [
    (["--candidates", "exact_copy,nope"], "unknown strategy 'nope'"),
    (["--budget", "100000"], "need"),
    (["--budget", "4", "--probe-steps", "8"], "--probe-steps 8 is beyond --budget 4"),
])
def test_cli_refuses_bad_input_with_nothing_written(small_run, tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.setenv("GROWKERN_CACHE", str(small_run.parent / "cache"))
    out = tmp_path / "sel"
    rc = cli.main(["select", str(small_run), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@needs_real
def test_cli_refuses_an_existing_out(small_run, tmp_path, capsys):
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "keep.txt").write_text("mine")
    rc = cli.main(["select", str(small_run), "--out", str(tmp_path / "sel")])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "sel").iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """checkpoint-3 of a tiny Llama Trainer run, saved with a tokenizer of the TinyStories text."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("trainer_run")
    tok = D.train_tokenizer(D.read_stories(REAL / "train.txt")[:200], vocab_size=300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=D.BOS, eos_token=D.EOS,
                                                pad_token=D.EOS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    ids = torch.randint(0, len(fast), (12, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(output_dir=str(root), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps",
                                          save_steps=3)
    transformers.Trainer(model=model, args=args, train_dataset=data, processing_class=fast).train()
    return root / "checkpoint-3"


@needs_real
def test_cli_selects_for_a_trainer_checkpoint(trainer_checkpoint, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "sel"
    rc = cli.main(["select", str(trainer_checkpoint), "--out", str(out), "--data", str(REAL), "--budget", "2",
                   "--probe-steps", "1", "--candidates", "exact_copy,asym_reset", "--block-size", "32",
                   "--batch-size", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "trainer.train(resume_from_checkpoint=" in text and (out / "ranking.md").is_file()
    assert (out / "optimizer.pt").is_file() and (out / "trainer_state.json").is_file()
    grown = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert grown.config.hidden_size == 32


def test_readme_selection_snippet_runs_as_written(capsys):
    """The README's selection block, after its first block (the model made smaller, so
    the test is fast; the selection block itself runs as written)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    select_block = next(b for b in blocks if "select_warm_start" in b)
    first = blocks[0].replace("d_model=128, n_head=4, n_layer=4", "d_model=16, n_head=2, n_layer=1")
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    exec(compile(select_block, "README.md", "exec"), namespace)
    sel, model = namespace["selection"], namespace["model"]
    assert model.config.d_model == 64 and sel.best in [r["candidate"] for r in sel.rows]
    assert "Continue from" in capsys.readouterr().out
