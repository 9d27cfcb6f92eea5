"""README.md must stay true: every fenced shell command that can run offline on CPU is run.

A command is a line (with `\\` continuations) in a fenced block (no language, or sh / bash / shell /
console) that starts with txl-train, txl-eval, txl-generate, txl-convert, python or make. It is not
run when
  * its trailing comment starts with `gpu`, `network` or `not-run` (e.g. `# gpu: the paper's run`), or
  * the block is preceded by `<!-- readme-test: skip (why) -->`, or
  * it is `make test` / `make test-fast` (this suite itself).
Every other command must run here. Because these are the README's real commands (1000-step trainings,
a whole test split), fast overrides are APPENDED: Hydra applies overrides in order and a later value
of a key wins, so the command keeps its own meaning (data, model, attention, lengths) and only gets
shorter (2 steps, a 200 kB corpus, 3000 eval tokens). File names that stand for "your files" (a.txt,
book.txt, m.pt, outputs/…/last.ckpt) are supplied: text files from a small corpus, checkpoints from
the first training command the README shows. Commands run with the interpreter running this test
(`txl-train` -> `python -m txl.train`, `make train` -> `make -o install train VENV=<this venv>`: the
Makefile's own recipe, without installing a second environment).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("txl-train", "txl-eval", "txl-generate", "txl-convert")
CANDIDATES = TOOLS + ("python", "python3", "make")
SHELL_LANGS = ("", "sh", "bash", "shell", "console")
SKIP_WORDS = ("gpu", "network", "not-run")
SKIP_COMMENT = re.compile(r"<!--\s*readme-test:\s*skip\b")
SUITE = (("make", "test"), ("make", "test-fast"))

# Appended to each command (later overrides win): as short as possible, same code paths. No
# val_check_interval: a run shorter than it must still end with a validation figure (README).
FAST = {
    "train": ["trainer.max_steps=2", "trainer.limit_val_batches=1",
              "data.max_bytes=200000", "data.batch_size=2", "data.eval_batch_size=2", "trainer.peak_flops=1e11",
              "trainer.enable_progress_bar=false", "logger=csv", "checkpoint.every_n_steps=0"],
    "eval": ["eval.max_tokens=3000"],
    "generate": ["max_new_tokens=8"],
}


@dataclass
class Command:
    line: int          # README line number of its first line
    argv: list
    comment: str = ""
    skip: str = ""     # why it is not run ("" = it runs)
    tool: str = field(init=False, default="")

    def __post_init__(self):
        a = self.argv
        self.tool = (a[0][4:] if a[0] in TOOLS else "make " + a[1] if a[0] == "make" and len(a) > 1 and "=" not in a[1]
                     else a[0])


def _split_comment(line: str) -> tuple[str, str]:
    """'cmd args  # note' -> ('cmd args', 'note'); a '#' inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
    out, lines = [], text.splitlines()
    i, fence, skip_block, prev = 0, None, "", ""
    while i < len(lines):
        raw = lines[i]
        s = raw.strip()
        if fence is None:
            if s.startswith("```"):
                fence = s[3:].strip().lower()
                skip_block = "block marked skip" if SKIP_COMMENT.search(prev) else ""
            elif s:
                prev = s
            i += 1
            continue
        if s.startswith("```"):
            fence, prev = None, ""
            i += 1
            continue
        start, buf = i + 1, s
        while buf.endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            buf = buf[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        if fence not in SHELL_LANGS:
            continue
        buf = buf[2:] if buf.startswith("$ ") else buf
        cmd, comment = _split_comment(buf)
        try:
            argv = shlex.split(cmd)
        except ValueError:
            continue
        if not argv or argv[0] not in CANDIDATES:
            continue
        c = Command(start, argv, comment)
        word = re.split(r"[\s:,;(]", comment, maxsplit=1)[0].lower() if comment else ""
        if word in SKIP_WORDS:
            c.skip = f"marked {word}"
        elif skip_block:
            c.skip = skip_block
        elif tuple(argv[:2]) in SUITE:
            c.skip = "the test suite itself"
        out.append(c)
    return out


def test_extractor_finds_commands_markers_and_continuations():
    md = "\n".join([
        "text `txl-train inline` is not a block", "```", "make train   # creates .venv",
        "txl-train model=tiny \\", "          seq.mem_len=8   # a quick run", "conf/model/  sizes",
        "txl-train experiment=x trainer=gpu  # gpu: the paper's", "make test", "```",
        "<!-- readme-test: skip (needs a cluster) -->", "```bash", "python scripts/x.py --n 2", "```",
        "```yaml", "python: 3", "```", "```", "$ txl-eval ckpt_path=m.pt prompt='a # b'  # network", "```"])
    got = [(c.line, c.argv, c.skip) for c in readme_commands(md)]
    assert got == [(3, ["make", "train"], ""), (4, ["txl-train", "model=tiny", "seq.mem_len=8"], ""),
                   (7, ["txl-train", "experiment=x", "trainer=gpu"], "marked gpu"),
                   (8, ["make", "test"], "the test suite itself"),
                   (12, ["python", "scripts/x.py", "--n", "2"], "block marked skip"),
                   (18, ["txl-eval", "ckpt_path=m.pt", "prompt=a # b"], "marked network")]


def _readme() -> list[Command]:
    return readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_runnable_commands():
    cmds = _readme()
    runnable = [c for c in cmds if not c.skip]
    assert any(c.argv[:2] == ["make", "train"] for c in runnable)
    assert {c.tool for c in runnable} >= {"train", "eval"}
    for c in runnable:  # what the slow test cannot supply must be marked, not silently left out
        assert c.tool in ("train", "eval", "generate", "convert", "make train") or c.argv[0].startswith("python"), \
            f"README.md:{c.line}: cannot run {' '.join(c.argv)!r} here; mark it (# gpu / # network / # not-run)"


class Sandbox:
    """A working directory with the files README commands name, and the runner."""

    def __init__(self, tmp: Path, env: dict, corpus: tuple):
        self.dir, self.env, self.corpus, self.n = tmp / "work", dict(env), corpus, 0
        self.dir.mkdir()
        for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # when make test runs us: a clean inner make
            self.env.pop(k, None)
        self.ckpt = None  # the first training command's last.ckpt

    def _supply(self, value: str, key: str) -> str:
        """Stand-ins for the README's example file names (only names that do not exist)."""
        p = Path(value)
        if key == "ckpt_path" or p.suffix in (".ckpt", ".pt") and key != "--out":
            if (self.dir / p).exists() or p.exists():
                return value
            assert self.ckpt, f"{value}: a checkpoint is named before any training command ran"
            return str(self.ckpt)
        if p.suffix == ".txt" and not (self.dir / p).exists() and not p.is_absolute():
            src = {"train": 0, "valid": 1, "test": 2}.get(key.rsplit(".", 1)[-1], 2)
            (self.dir / p).parent.mkdir(parents=True, exist_ok=True)
            (self.dir / p).write_text(Path(self.corpus[src]).read_text())
        return value

    def rewrite(self, args: list) -> list:
        out = []
        for a in args:
            if "=" in a and not a.startswith("-"):
                k, v = a.split("=", 1)
                out.append(f"{k}={self._supply(v, k)}")
            elif out and out[-1].startswith("--"):
                out.append(self._supply(a, out[-1]))
            else:
                out.append(a)
        return out

    def run(self, c: Command) -> subprocess.CompletedProcess:
        self.n += 1
        run_dir = self.dir / f"run{self.n}"
        if c.tool in ("train", "eval", "generate"):
            argv = [sys.executable, "-m", f"txl.{c.tool}", *self.rewrite(c.argv[1:]), *FAST[c.tool],
                    f"hydra.run.dir={run_dir}"]
            cwd = self.dir
        elif c.tool == "convert":
            argv, cwd = [sys.executable, "-m", "txl.convert", *self.rewrite(c.argv[1:])], self.dir
        elif c.tool == "make train":
            given = [a for a in c.argv[2:] if not a.startswith("ARGS=")]
            args = " ".join([*(a[5:] for a in c.argv[2:] if a.startswith("ARGS=")), *FAST["train"],
                             f"hydra.run.dir={run_dir}"])
            argv, cwd = ["make", "-s", "-o", "install", "train", f"VENV={sys.prefix}", *given, f"ARGS={args}"], ROOT
        else:  # python ...
            argv, cwd = [sys.executable, *self.rewrite(c.argv[1:])], ROOT
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=str(cwd), env=self.env)
        if c.tool in ("train", "make train") and r.returncode == 0 and self.ckpt is None:
            self.ckpt = run_dir / "checkpoints" / "last.ckpt"
        return r


@pytest.mark.slow
def test_readme_commands_run(tmp_path, cli_env, corpus_files):
    cmds = [c for c in _readme() if not c.skip]
    trains = [c for c in cmds if c.tool in ("train", "make train")]
    cmds = trains + [c for c in cmds if c not in trains]  # checkpoints exist before eval / generate need them
    box = Sandbox(tmp_path, cli_env, corpus_files)
    for c in cmds:
        r = box.run(c)
        assert r.returncode == 0, f"README.md:{c.line}: {' '.join(c.argv)} -> exit {r.returncode}\n{r.stderr[-3000:]}"
        if c.tool == "make train":  # the README: make train ends with a checkpoint and a validation figure
            summary = json.loads(r.stdout.strip().splitlines()[-1])
            assert "val_bpb" in summary and Path(summary["last_ckpt"]).is_file(), r.stdout[-2000:]
        if c.tool == "eval":
            assert "ppl" in json.loads(r.stdout.strip().splitlines()[-1])


def test_offline_hint_names_the_readme_override():
    """README: offline, hub datasets fail with one line pointing at `data=text_files ...` (the group
    override the README teaches, not `data.source=text_files`, which keeps the preset's hub fields)."""
    from txl.data.hub import offline_message
    msg = offline_message("wikitext", "no network")
    assert "use data=text_files data.train=" in msg and "data.source=" not in msg
    assert "(`data=text_files ...`)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_wheel_ships_every_package_and_the_configs():
    """`pip install .` (not editable) must give working CLIs: every txl package is listed in pyproject.toml
    (an explicit list, because conf/ is mapped in as txl.conf) and every conf/*.yaml is package data."""
    import fnmatch
    import tomllib
    st = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {str(p.parent.relative_to(ROOT)).replace(os.sep, ".") for p in (ROOT / "txl").rglob("__init__.py")}
    assert found <= set(st["packages"]), f"add to [tool.setuptools] packages: {sorted(found - set(st['packages']))}"
    assert st["package-dir"]["txl.conf"] == "conf"
    globs = st["package-data"]["txl.conf"]
    for y in (ROOT / "conf").rglob("*"):
        if y.is_file():
            rel = y.relative_to(ROOT / "conf").as_posix()
            assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel
