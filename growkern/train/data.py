"""TinyStories data: reading, tokenizer, token cache and batching.

The pipeline is nanoGPT-like: text -> byte-level BPE -> one flat uint16 token
array per split on disk (memory-mapped) -> random (x, y) windows for training
and fixed windows for evaluation.

Reproducibility rules that the rest of the project relies on:
  * the token cache is keyed by the exact input bytes, so a cache hit always
    means "same data, same tokenizer";
  * training batch i is a pure function of (seed, [salt,] i), so the data
    cursor of a run is a single integer and resuming reproduces the stream.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .staging import atomic_open, remove_stale_staging, staging_name

BOS = "<|bos|>"
EOS = "<|eos|>"
SEPARATOR = "<|endoftext|>"

HUB_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{}"
HUB_FILES = ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")
LOCAL_FILES = ("train.txt", "valid.txt")

# Bump when the on-disk cache layout or encoding changes, so old caches are
# never mistaken for current ones.
CACHE_FORMAT = 1
# uint16 storage: every token id must fit, and we keep 65535 free.
MAX_VOCAB = 65535
# 256 byte symbols + the two special tokens: below this BPE cannot even
# represent its alphabet, and the trainer would silently exceed the request.
MIN_VOCAB = 256 + 2

# A separator is a line that is exactly SEPARATOR once surrounding whitespace
# is ignored; a separator glued to text on the same line is story text.
_SEPARATOR_RE = re.compile(r"^\s*" + re.escape(SEPARATOR) + r"\s*$", re.MULTILINE)


# --------------------------------------------------------------------------
# Reading stories


def read_stories(path: str | os.PathLike) -> list[str]:
    """Read the stories in a TinyStories file.

    ``.txt``: stories separated by ``<|endoftext|>`` lines (the dataset's own
    format). ``.json``/``.jsonl``/``.parquet``: hub shards with a ``text``
    field. Stories are stripped and empty ones dropped; text is otherwise
    kept as is (no unicode normalisation).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        texts = _read_texts(path, suffix)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: it holds byte {e.object[e.start]:#04x}, "
                         f"which UTF-8 cannot decode; re-encode the file as UTF-8 (e.g. iconv -t UTF-8)") from None
    stories = (t.strip() for t in texts)
    return [s for s in stories if s]


def _read_texts(path: Path, suffix: str) -> list[str]:
    if suffix == ".txt":
        # Text mode gives universal newlines, so CRLF files split the same way.
        texts = _SEPARATOR_RE.split(path.read_text(encoding="utf-8"))
    elif suffix in (".json", ".jsonl"):
        texts = _read_json_texts(path)
    elif suffix == ".parquet":
        texts = _read_parquet_texts(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} "
                         "(expected .txt, .json, .jsonl or .parquet)")
    return texts


def _read_json_texts(path: Path) -> list[str]:
    # The standard library reads both shapes the hub uses (a JSON array of
    # records, or one record per line), so no extra dependency is needed.
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            records = json.load(f)
        else:
            records = [json.loads(line) for line in f if line.strip()]
    try:
        return [r["text"] for r in records]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected records with a 'text' field") from None


def _read_parquet_texts(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow "
                          "(or pip install datasets, which brings it)") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no 'text' column (have {table.column_names})")
    return table.column("text").to_pylist()


# --------------------------------------------------------------------------
# Finding (or downloading) the data


def cache_root() -> Path:
    """Root of everything growkern caches: $GROWKERN_CACHE or ~/.cache/growkern."""
    root = os.environ.get("GROWKERN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "growkern"


def download(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar; dest appears only when complete."""
    from tqdm import tqdm  # only needed on this path; keep imports light

    remove_stale_staging(dest)  # what a killed download left
    tmp = staging_name(dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def repo_sample() -> Path:
    """The offline TinyStories sample beside the repository (../shared/data/tinystories)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories"


def default_data(data: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """The data of the commands and studies: ``data`` (--data), then $GROWKERN_DATA,
    then the sample beside the repository when it holds train.txt and valid.txt;
    None means the hub (resolve_data_dir downloads TinyStories)."""
    if data:
        return data
    if os.environ.get("GROWKERN_DATA"):
        return os.environ["GROWKERN_DATA"]
    sample = repo_sample()
    if all((sample / name).is_file() for name in LOCAL_FILES):
        return str(sample)
    return None


def resolve_data_dir(data: str | os.PathLike | None = None) -> Path:
    """Directory holding the train/valid text files.

    Precedence: ``data`` argument, then $GROWKERN_DATA, then the download
    cache ``<cache_root>/tinystories`` (filled from the Hugging Face hub on
    first use).
    """
    explicit = data if data is not None else os.environ.get("GROWKERN_DATA")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data path {path} is not a directory (expected one holding "
                f"{LOCAL_FILES[0]}/{LOCAL_FILES[1]} or the hub's files)")
        return path

    path = cache_root() / "tinystories"
    path.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        if (path / name).exists():
            continue
        try:
            download(HUB_URL.format(name), path / name)
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            raise RuntimeError(
                f"could not download {name} from the Hugging Face hub ({e}).\n"
                "To use local files instead, pass --data PATH or set GROWKERN_DATA=PATH, "
                "where PATH is a directory holding train.txt and valid.txt "
                f"(or {HUB_FILES[0]} and {HUB_FILES[1]}); "
                f"or put the hub files into {path} yourself."
            ) from e
    return path


def split_files(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(train_path, valid_path) inside data_dir, local names first."""
    data_dir = Path(data_dir)
    for train_name, valid_name in (LOCAL_FILES, HUB_FILES):
        train, valid = data_dir / train_name, data_dir / valid_name
        if train.is_file() and valid.is_file():
            return train, valid
    present = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    raise FileNotFoundError(
        f"{data_dir} must contain {LOCAL_FILES[0]} and {LOCAL_FILES[1]}, "
        f"or {HUB_FILES[0]} and {HUB_FILES[1]}; found {present or 'nothing'}"
    )


# --------------------------------------------------------------------------
# Tokenizer


def _check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}] "
                         f"(tokens are stored as uint16), got {vocab_size}")


def train_tokenizer(stories: Sequence[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE with <|bos|> (id 0) and <|eos|> (id 1).

    Byte level means any unicode text round-trips exactly; the trainer is
    deterministic for identical input, which the cache key relies on.
    """
    _check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer, length=len(stories))
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def _special_ids(tok: Tokenizer) -> tuple[int, int]:
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError(f"tokenizer lacks the special tokens {BOS} and {EOS}")
    return bos, eos


# --------------------------------------------------------------------------
# Token cache


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray  # uint16 np.memmap: BOS story EOS BOS story EOS ...
    valid: np.ndarray
    vocab_size: int    # actual tokenizer size (may be below the request on tiny data)
    bos_id: int
    eos_id: int
    key: str
    path: Path         # the cache directory these came from


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def cache_key(train_path: Path, valid_path: Path, tokenizer_path: Path | None,
              vocab_size: int) -> str:
    """Short sha256 over everything that determines the token arrays."""
    tok_part = (_sha256_file(tokenizer_path) if tokenizer_path is not None
                else f"train_tokenizer(vocab_size={vocab_size})")
    # Hash the parts' digests, so a byte moving from one file to the other
    # cannot produce the same key.
    parts = [f"format={CACHE_FORMAT}", _sha256_file(train_path),
             _sha256_file(valid_path), tok_part]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _encode_to_file(tok: Tokenizer, stories: list[str], bos: int, eos: int,
                    path: Path, chunk: int = 8192) -> int:
    # Chunks bound memory on the full dataset (millions of stories) while
    # encode_batch still parallelises within each chunk.
    n = 0
    with atomic_open(path) as f:
        for i in range(0, len(stories), chunk):
            encs = tok.encode_batch(stories[i:i + chunk], add_special_tokens=False)
            ids = [bos]
            for e in encs:
                ids.extend(e.ids)
                ids.append(eos)
                ids.append(bos)
            ids.pop()  # the trailing BOS belongs to no story
            arr = np.asarray(ids, dtype=np.uint16)
            arr.tofile(f)
            n += arr.size
    return n


def _load_cached(path: Path, key: str) -> Corpus | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        return None
    arrays = {}
    for split in ("train", "valid"):
        f = path / f"{split}.bin"
        # meta.json is written last, but guard anyway against files that were
        # replaced or truncated behind our back.
        if not f.is_file() or f.stat().st_size != 2 * meta.get(f"{split}_tokens", -1):
            return None
        arrays[split] = np.memmap(f, dtype=np.uint16, mode="r")
    tok = load_tokenizer(path / "tokenizer.json")
    bos, eos = _special_ids(tok)
    return Corpus(tok, arrays["train"], arrays["valid"], tok.get_vocab_size(),
                  bos, eos, key, path)


def prepare(data: str | os.PathLike | None = None, vocab_size: int = 4096,
            tokenizer_path: str | os.PathLike | None = None,
            cache_dir: str | os.PathLike | None = None) -> Corpus:
    """Tokenize train/valid once and return memory-mapped token arrays.

    The corpus lives in ``<cache_dir>/<key>/`` (default cache_dir:
    ``<cache_root>/corpus``). With ``tokenizer_path`` that tokenizer is used
    and ``vocab_size`` is ignored; otherwise a tokenizer is trained on train.
    """
    if tokenizer_path is None:
        _check_vocab_size(vocab_size)  # fail before any expensive work
    train_path, valid_path = split_files(resolve_data_dir(data))
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
    key = cache_key(train_path, valid_path, tokenizer_path, vocab_size)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "corpus"
    path = root / key

    corpus = _load_cached(path, key)
    if corpus is not None:
        return corpus

    path.mkdir(parents=True, exist_ok=True)
    train_stories = read_stories(train_path)
    valid_stories = read_stories(valid_path)
    for p, stories in ((train_path, train_stories), (valid_path, valid_stories)):
        if not stories:
            raise ValueError(f"{p} holds no stories")

    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        _check_vocab_size(tok.get_vocab_size())
    else:
        tok = train_tokenizer(train_stories, vocab_size)
    bos, eos = _special_ids(tok)
    with atomic_open(path / "tokenizer.json", "w") as f:
        f.write(tok.to_str())

    counts = {
        "train_tokens": _encode_to_file(tok, train_stories, bos, eos, path / "train.bin"),
        "valid_tokens": _encode_to_file(tok, valid_stories, bos, eos, path / "valid.bin"),
    }
    meta = {
        "format": CACHE_FORMAT, "key": key, "vocab_size": tok.get_vocab_size(),
        "bos_id": bos, "eos_id": eos,
        "train_file": str(train_path), "valid_file": str(valid_path),
        "train_stories": len(train_stories), "valid_stories": len(valid_stories),
        **counts,
    }
    # Last: its presence is what marks the cache as complete.
    with atomic_open(path / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)

    corpus = _load_cached(path, key)
    assert corpus is not None
    return corpus


# --------------------------------------------------------------------------
# Batching


def get_batch(tokens: np.ndarray, block_size: int, batch_size: int,
              generator: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows; y is x shifted left by one token."""
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(f"need more than block_size={block_size} tokens, have {n}")
    starts = generator.integers(0, n - block_size, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)],
                         dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class Batches:
    """Endless, reproducible stream of training batches.

    Batch i is drawn from a generator seeded only by (regime, seed, salt, i),
    so the stream needs no hidden state: two objects with the same arguments
    agree, and ``state_dict()`` is just the cursor i.

    shuffle=False (deterministic regime): the order depends on ``seed`` only,
    so every run with that seed sees identical data. shuffle=True (stochastic
    regime): ``salt`` (e.g. the run or replica index) is mixed in so runs
    sharing a seed see different orders, each still reproducible.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int,
                 seed: int = 0, shuffle: bool = False, salt: int = 0):
        if len(tokens) < block_size + 1:
            raise ValueError(f"need more than block_size={block_size} tokens, "
                             f"have {len(tokens)}")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.salt = salt
        self.step = 0  # batches drawn so far

    def generator(self, i: int) -> np.random.Generator:
        # Fixed-length entropy with a regime tag: SeedSequence may map
        # sequences differing only by trailing zeros to the same state.
        salt = self.salt if self.shuffle else 0
        return np.random.Generator(
            np.random.PCG64([int(self.shuffle), self.seed, salt, i]))

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number i of the stream, without moving the cursor."""
        return get_batch(self.tokens, self.block_size, self.batch_size,
                         self.generator(i))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.batch(self.step)
        self.step += 1
        return xy

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "shuffle": self.shuffle,
                "salt": self.salt}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.salt = int(state.get("salt", self.salt))


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                 max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping validation windows, spread evenly over tokens.

    Every call with the same arguments returns the same windows, so validation
    losses are comparable across runs. The last batch may be smaller than
    batch_size; weight by x.shape[0] when averaging.
    """
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"need more than block_size={block_size} tokens, "
                         f"have {len(tokens)}")
    want = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    # Evenly spaced window indices cover the whole split, not just its start,
    # when max_batches caps the count; distinct indices never overlap.
    picks = np.unique(np.linspace(0, n_windows - 1, want).round().astype(np.int64))
    starts = picks * block_size
    out = []
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        windows = np.asarray(tokens[s[:, None] + np.arange(block_size + 1)],
                             dtype=np.int64)
        out.append((torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
                    torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))))
    return out
