"""Every command the README shows runs as written: each `growkern ...` line of its bash
blocks parses (shell syntax and the CLI's own), the install lines name real files, and
its first Python block runs."""
import re
import shlex
from pathlib import Path

import pytest

from growkern import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def test_readme_has_the_two_commands_first():
    first = readme_commands()[:2]
    assert first[0].startswith("pip install") and "growkern demo" in (ROOT / "README.md").read_text()
    assert len(first) == 2


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith(("growkern", "python", "torchrun"))])
def test_readme_command_parses(command):
    words = shlex.split(command)
    if words[0] == "torchrun":  # torchrun [its options] -m growkern ARGS
        assert "-m" in words and words[words.index("-m") + 1] == "growkern", command
        words = ["growkern"] + words[words.index("-m") + 2:]
    # no shell operators hiding in a line (`--preset a|b|c` is a pipe in a shell)
    assert not {"|", ";", "&", ">", "<"} & set("".join(w for w in words if not w.startswith(("'", '"')))), command
    if words[0] == "growkern":
        cli._load_extensions()
        cli.build_parser().parse_args(words[1:])  # SystemExit(2) on anything argparse refuses
    elif words[:3] == ["python", "-m", "pytest"]:
        assert all((ROOT / w).exists() for w in words[3:] if not w.startswith("-"))
    elif words[:2] == ["python", "bench/bench_growth.py"] or words[1].startswith("bench/"):
        assert (ROOT / words[1]).is_file()


def test_readme_install_lines_name_real_files():
    for command in readme_commands():
        words = shlex.split(command)
        if words[:2] == ["pip", "install"] and "-r" in words:
            assert (ROOT / words[words.index("-r") + 1]).is_file()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_first_snippet_runs_as_written(capsys):
    """The README's first Python block, the one a new user copies, runs as it is: its
    imports are there (torch too), GPT.forward returns (logits, loss), and widen_ grows
    the model it trained."""
    namespace = {}
    exec(compile(readme_python_blocks()[0], "README.md", "exec"), namespace)
    model, report = namespace["model"], namespace["report"]
    assert model.config.d_model == 256 and report.dims_after["d_model"] == 256
    assert report.preservation["kl_small_wide"] < 1e-6
    assert "growkern.widen_" in capsys.readouterr().out
