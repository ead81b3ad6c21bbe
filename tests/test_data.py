import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from growkern.train import data as D

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
needs_real = pytest.mark.skipif(
    not (REAL / "train.txt").is_file() or not (REAL / "valid.txt").is_file(),
    reason=f"TinyStories sample not found at {REAL}",
)
VOCAB = 512  # small: training takes a fraction of a second


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # Never touch the user's cache or data settings, and never the network.
    monkeypatch.setenv("GROWKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GROWKERN_DATA", raising=False)

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(D, "download", no_network)


def write_split(d: Path, train: str, valid: str, names=D.LOCAL_FILES) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / names[0]).write_text(train, encoding="utf-8")
    (d / names[1]).write_text(valid, encoding="utf-8")
    return d


def tiny_text(n: int, tag: str = "") -> str:
    return "".join(f"Once upon a time {tag} cat number {i} was happy.\n<|endoftext|>\n"
                   for i in range(n))


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    if not (REAL / "train.txt").is_file():
        pytest.skip(f"TinyStories sample not found at {REAL}")
    return D.prepare(REAL, vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------- reading


def test_read_stories_separators(tmp_path):
    text = (
        "\n\nFirst story.\nSecond line.  \n<|endoftext|>\n"
        "\n   <|endoftext|>   \n"          # empty story, separator with spaces
        "<|endoftext|>\n"                  # another empty one
        "Café 🐉 story\n\nwith a blank line\n<|endoftext|>\n"
        "not a separator: <|endoftext|> mid-line\n<|endoftext|>\n"
        "Last story without trailing separator\n\n"
    )
    p = tmp_path / "s.txt"
    p.write_text(text, encoding="utf-8")
    assert D.read_stories(p) == [
        "First story.\nSecond line.",
        "Café 🐉 story\n\nwith a blank line",
        "not a separator: <|endoftext|> mid-line",
        "Last story without trailing separator",
    ]


def test_read_stories_crlf_and_empty(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"one\r\n<|endoftext|>\r\ntwo\r\nmore\r\n<|endoftext|>\r\n")
    assert D.read_stories(p) == ["one", "two\nmore"]
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n  \n", encoding="utf-8")
    assert D.read_stories(tmp_path / "empty.txt") == []


@pytest.mark.parametrize("name", ["valid.txt", "valid.jsonl"])
def test_non_utf8_file_is_named(tmp_path, name):
    story = "Жила-была кошка.".encode("cp1251")  # 0xc6 ... : not UTF-8
    p = tmp_path / name
    p.write_bytes(story + b"\n<|endoftext|>\n" if name.endswith(".txt") else b'{"text": "' + story + b'"}\n')
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text: it holds byte 0x[0-9a-f]{{2}}"):
        D.read_stories(p)


def test_read_stories_json_shards(tmp_path):
    recs = [{"text": " a café "}, {"text": ""}, {"text": "b 🐉"}]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "s.json").write_text(json.dumps(recs))
    assert D.read_stories(tmp_path / "s.jsonl") == ["a café", "b 🐉"]
    assert D.read_stories(tmp_path / "s.json") == ["a café", "b 🐉"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"story": "x"}))
    with pytest.raises(ValueError, match="'text'"):
        D.read_stories(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="unsupported"):
        D.read_stories(tmp_path / "s.csv")


def test_read_stories_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            D.read_stories(tmp_path / "s.parquet")
        return
    pq.write_table(pa.table({"text": ["x ", "", "y"]}), tmp_path / "s.parquet")
    assert D.read_stories(tmp_path / "s.parquet") == ["x", "y"]


@needs_real
def test_real_story_counts():
    train = D.read_stories(REAL / "train.txt")
    valid = D.read_stories(REAL / "valid.txt")
    assert (len(train), len(valid)) == (1727, 1000)
    assert all(s == s.strip() and s for s in train + valid)
    assert not any(s == D.SEPARATOR for s in train + valid)


# ---------------------------------------------------------------- locating data


def test_split_files_both_namings(tmp_path):
    local = write_split(tmp_path / "a", "x", "y")
    assert D.split_files(local) == (local / "train.txt", local / "valid.txt")
    hub = write_split(tmp_path / "b", "x", "y", names=D.HUB_FILES)
    assert D.split_files(hub) == (hub / D.HUB_FILES[0], hub / D.HUB_FILES[1])


def test_split_files_missing(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        D.split_files(tmp_path)
    msg = str(e.value)
    for name in ("train.txt", "valid.txt", *D.HUB_FILES):
        assert name in msg


def test_resolve_precedence(tmp_path, monkeypatch):
    a = write_split(tmp_path / "a", "x", "y")
    b = write_split(tmp_path / "b", "x", "y")
    monkeypatch.setenv("GROWKERN_DATA", str(b))
    assert D.resolve_data_dir(a) == a
    assert D.resolve_data_dir() == b
    with pytest.raises(FileNotFoundError, match="not a directory"):
        D.resolve_data_dir(tmp_path / "nope")


def test_resolve_uses_cached_download(tmp_path):
    # Files already in the cache: no download is attempted (the autouse
    # fixture makes any download fail the test).
    cached = write_split(tmp_path / "cache" / "tinystories", "x", "y", names=D.HUB_FILES)
    assert D.resolve_data_dir() == cached


def test_resolve_offline_error(tmp_path, monkeypatch):
    calls = []

    def offline(url, dest):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(D, "download", offline)
    with pytest.raises(RuntimeError) as e:
        D.resolve_data_dir()
    msg = str(e.value)
    assert "--data" in msg and "GROWKERN_DATA" in msg and "train.txt" in msg
    assert calls and calls[0].startswith("https://huggingface.co/datasets/roneneldan/TinyStories/")
    assert not any((tmp_path / "cache" / "tinystories").iterdir())


# ---------------------------------------------------------------- tokenizer


@needs_real
def test_tokenizer_roundtrip_and_determinism():
    stories = D.read_stories(REAL / "train.txt")
    tok = D.train_tokenizer(stories, VOCAB)
    assert tok.get_vocab_size() == VOCAB
    assert (tok.token_to_id(D.BOS), tok.token_to_id(D.EOS)) == (0, 1)
    valid = D.read_stories(REAL / "valid.txt")[:200] + ["café 🐉  double  spaces\n\nend"]
    for s in valid:
        assert tok.decode(tok.encode(s).ids) == s
    assert D.train_tokenizer(stories, VOCAB).to_str() == tok.to_str()


def test_vocab_size_limits(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        D.train_tokenizer(["a b c"], 70000)
    d = write_split(tmp_path / "d", tiny_text(5), tiny_text(2))
    with pytest.raises(ValueError, match="uint16"):
        D.prepare(d, vocab_size=65536, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError):
        D.prepare(d, vocab_size=100, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- cache


def test_real_corpus_layout(real_corpus):
    c = real_corpus
    for arr in (c.train, c.valid):
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        assert arr[0] == c.bos_id and arr[-1] == c.eos_id
        assert arr.max() < c.vocab_size
    assert (c.train == c.bos_id).sum() == (c.train == c.eos_id).sum() == 1727
    assert (c.valid == c.bos_id).sum() == 1000
    first = D.read_stories(REAL / "valid.txt")[0]
    end = int(np.argmax(np.asarray(c.valid) == c.eos_id))
    assert c.tokenizer.decode(c.valid[1:end].tolist()) == first
    assert c.vocab_size == VOCAB
    meta = json.loads((c.path / "meta.json").read_text())
    assert meta["key"] == c.key and meta["train_stories"] == 1727
    assert not [f.name for f in c.path.iterdir() if ".tmp-" in f.name]  # no staging leftovers


def test_cache_reuse_without_retraining(tmp_path, monkeypatch):
    d = write_split(tmp_path / "d", tiny_text(40), tiny_text(10, "v"))
    first = D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("tokenizer retrained despite a valid cache")

    monkeypatch.setattr(D, "train_tokenizer", boom)
    again = D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")
    assert again.key == first.key and again.path == first.path
    assert np.array_equal(again.train, first.train)
    assert np.array_equal(again.valid, first.valid)
    assert again.tokenizer.to_str() == first.tokenizer.to_str()

    # A cache without meta.json counts as half-written and is rebuilt.
    (first.path / "meta.json").unlink()
    with pytest.raises(AssertionError, match="retrained"):
        D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")


def test_cache_writes_remove_what_killed_writers_left(tmp_path):
    from test_train import dead_pid
    d = write_split(tmp_path / "d", tiny_text(40), tiny_text(10, "v"))
    first = D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")
    dead, files = dead_pid(), sorted(f for f in first.path.iterdir() if f.is_file())
    left = [f.with_name(f".{f.name}.tmp-{dead}-0123abcd") for f in files]  # as killed mid-write
    live = files[0].with_name(f".{files[0].name}.tmp-{os.getpid()}-feedbeef")  # a writer at work
    for f in left + [live]:
        f.write_bytes(b"partial")
    for f in files:
        f.unlink()  # the cache is rebuilt, each file written again beside its leftover
    D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")
    assert not any(f.exists() for f in left) and live.exists()


def test_cache_key_changes(tmp_path):
    d = write_split(tmp_path / "d", tiny_text(40), tiny_text(10, "v"))
    base = D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")
    keys = {base.key}

    (d / "valid.txt").write_text(tiny_text(11, "v"), encoding="utf-8")
    changed_valid = D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")
    keys.add(changed_valid.key)
    assert changed_valid.path != base.path
    assert (changed_valid.valid == changed_valid.bos_id).sum() == 11

    keys.add(D.prepare(d, vocab_size=301, cache_dir=tmp_path / "c").key)
    given = D.prepare(d, tokenizer_path=base.path / "tokenizer.json",
                      cache_dir=tmp_path / "c")
    keys.add(given.key)
    assert given.tokenizer.to_str() == base.tokenizer.to_str()
    assert len(keys) == 4


def test_prepare_rejects_empty_split(tmp_path):
    d = write_split(tmp_path / "d", tiny_text(5), "\n<|endoftext|>\n")
    with pytest.raises(ValueError, match="no stories"):
        D.prepare(d, vocab_size=300, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- batches


TOKENS = np.arange(10_000, dtype=np.uint16) % 5000


def test_batch_shapes_and_shift():
    x, y = next(iter(D.Batches(TOKENS, block_size=32, batch_size=4, seed=0)))
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        s = int(np.flatnonzero(TOKENS == row_x[0].item())[0])
        assert np.array_equal(TOKENS[s:s + 33], np.r_[row_x.numpy(), row_y[-1].item()])


def take(b, n):
    return [next(b) for _ in range(n)]


def same(a, b):
    return all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_batch_determinism():
    def mk(**kw):
        args = dict(block_size=16, batch_size=8, seed=1, shuffle=False, salt=0)
        args.update(kw)
        return take(D.Batches(TOKENS, **args), 5)

    ref = mk()
    assert same(ref, mk())
    assert not same(ref, mk(seed=2))
    assert same(ref, mk(salt=7))            # deterministic regime ignores salt
    shuf = mk(shuffle=True, salt=3)
    assert same(shuf, mk(shuffle=True, salt=3))
    assert not same(shuf, mk(shuffle=True, salt=4))
    assert not same(shuf, ref)
    assert not same(ref[:1], ref[1:2])      # consecutive batches differ


def test_state_dict_resume():
    a = D.Batches(TOKENS, 16, 8, seed=5, shuffle=True, salt=2)
    take(a, 3)
    state = a.state_dict()
    assert state["step"] == 3
    expected = take(a, 2)
    b = D.Batches(TOKENS, 16, 8, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint
    assert same(take(b, 2), expected)
    assert same([a.batch(3)], expected[:1])


def test_get_batch_and_short_tokens():
    g1 = np.random.Generator(np.random.PCG64(0))
    g2 = np.random.Generator(np.random.PCG64(0))
    assert same([D.get_batch(TOKENS, 8, 2, g1)], [D.get_batch(TOKENS, 8, 2, g2)])
    short = np.arange(8, dtype=np.uint16)
    with pytest.raises(ValueError):
        D.Batches(short, block_size=8, batch_size=2)
    x, y = D.get_batch(np.arange(9, dtype=np.uint16), 8, 3, g1)  # exactly one window
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))


def test_eval_batches():
    n, block = 1001, 10                      # exactly 100 windows
    tokens = np.arange(n, dtype=np.uint16)
    full = D.eval_batches(tokens, block, batch_size=32)
    assert [b[0].shape[0] for b in full] == [32, 32, 32, 4]
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert torch.equal(starts, torch.arange(0, 1000, 10))  # tile the split, no overlap
    for x, y in full:
        assert torch.equal(x[:, 1:], y[:, :-1])

    capped = D.eval_batches(tokens, block, batch_size=8, max_batches=3)
    assert len(capped) == 3 and all(x.shape == (8, block) for x, _ in capped)
    starts = torch.cat([x[:, 0] for x, _ in capped])
    assert len(set(starts.tolist())) == 24 and starts.min() == 0 and starts.max() == 990
    assert torch.all(starts.diff() >= block)
    again = D.eval_batches(tokens, block, batch_size=8, max_batches=3)
    assert same(capped, again)


@needs_real
def test_batches_on_real_corpus(real_corpus):
    b = D.Batches(real_corpus.valid, block_size=64, batch_size=4, seed=0)
    x, y = next(b)
    assert x.max() < real_corpus.vocab_size
    evals = D.eval_batches(real_corpus.valid, 64, 16, max_batches=4)
    assert len(evals) == 4
