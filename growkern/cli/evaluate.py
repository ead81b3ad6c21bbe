"""`growkern eval` and `growkern sample`: read a checkpoint, grown or not, and measure
or use it.

eval: the mean next-token loss on fixed validation windows of the run's data (or
--data, tokenized with the checkpoint's tokenizer). sample: text from the checkpoint's
tokenizer and model, one story after BOS, ending at EOS.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..train import checkpoint as ckpt_mod
from ..train import data as D
from ..train.distributed import resolve_device
from ..train.loop import evaluate
from .common import CLIError, _Formatter, corpus_for, non_negative_int, positive_float, positive_int, val_batches


def cmd_eval(args) -> int:
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    corpus, data_dir = corpus_for(ck, args.data)
    batches = val_batches(corpus, ck.train_config, args.batches)
    loss = evaluate(ck.model, batches)
    tokens = sum(x.numel() for x, _ in batches)
    result = {"step": ck.step, "val_loss": loss, "ppl": math.exp(loss), "tokens": tokens,
              "d_model": ck.gpt_config.d_model, "params": ck.model.num_params(),
              "growths": len(ck.growth_history)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ck.path} (step {ck.step}, d_model {ck.gpt_config.d_model}, {result['params']:,} params, "
              f"{len(ck.growth_history)} growth(s)): val loss {loss:.4f}, ppl {math.exp(loss):.2f} "
              f"on {tokens:,} tokens of {data_dir}")
    return 0


def load_tokenizer(ck):
    f = ck.tokenizer_file or (Path(ck.tokenizer["path"]) if (ck.tokenizer or {}).get("path") else None)
    if f is None or not f.is_file():
        raise CLIError(f"{ck.path} has no tokenizer.json and its tokenizer cache is gone")
    return D.load_tokenizer(f)


def generate_text(model, tok, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int):
    bos, eos = tok.token_to_id(D.BOS), tok.token_to_id(D.EOS)
    device = next(model.parameters()).device
    ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids  # stories start after BOS
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=gen)[0].tolist()
    new = out[len(ids):]
    if eos in new:
        new = new[:new.index(eos)]
    return prompt + tok.decode(new)


def cmd_sample(args) -> int:
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    tok = load_tokenizer(ck)
    for i in range(args.num):
        text = generate_text(ck.model, tok, args.prompt, args.tokens, args.temperature,
                             args.top_k or None, args.seed + i)
        print(text if args.num == 1 else f"--- sample {i + 1}\n{text}")
    return 0


# --- parser ---------------------------------------------------------------------

def add_parsers(sub) -> None:
    """`growkern eval` and `growkern sample` on the subparsers of build_parser."""
    e = sub.add_parser("eval", formatter_class=_Formatter, help="validation loss of a checkpoint",
                       description="Mean next-token loss on fixed validation windows.")
    e.add_argument("ckpt", metavar="CKPT", help="checkpoint or run directory")
    e.add_argument("--data", metavar="PATH", help="default: the run's data")
    e.add_argument("--batches", type=int, help="val batches (default: the run's eval_batches; 0: all)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", formatter_class=_Formatter, help="generate text from a checkpoint",
                       description="Generate text with a checkpoint's model and tokenizer, grown or not: "
                                   "each sample starts a story after BOS with --prompt and ends at the "
                                   "end-of-story token or after --tokens new tokens. Sampling is seeded: "
                                   "the same arguments print the same text.")
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint or run directory")
    s.add_argument("--prompt", default="Once upon a time", metavar="TEXT",
                   help="the text the story starts with, printed as given, then continued")
    s.add_argument("--tokens", type=non_negative_int, default=200, help="new tokens at most (stops at end of story)")
    s.add_argument("--temperature", type=positive_float, default=0.8,
                   help="divides the logits before sampling: lower is more predictable, higher more varied")
    s.add_argument("--top-k", type=non_negative_int, default=50, help="sample among the k likeliest tokens; "
                                                                       "0 disables")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling; sample i of --num uses seed + i")
    s.add_argument("--num", type=positive_int, default=1, help="number of samples")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.set_defaults(func=cmd_sample)
