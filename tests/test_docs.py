"""Every code block in README.md and docs/*.md runs as pasted, so the documentation cannot drift from the code.

- ```python blocks run, in order, in one namespace per file (a reader pasting them into one session).
  Only growir's own warnings may appear: any other warning is noise the user would see, and fails the block.
- ```bash / ```sh / ```console blocks run only when the line before the fence is ``<!-- test: run -->``
  (``bash -euo pipefail``, in a fresh temporary folder, with this interpreter's bin folder first on PATH and
  this checkout on PYTHONPATH). ``<!-- test: run slow -->`` blocks run only with GROWIR_DOCS=all
  (``make test-long``): each takes minutes on 2 cores.
- ``<!-- test: skip REASON -->`` before a python block skips it; the reason is required.
- Fences with no language or another one (diagrams, output samples) are text and never run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^<!--\s*test:\s*(?P<what>.*?)\s*-->$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # what follows "test:" in the comment just before the fence ("" when none)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (CommonMark fences: ``` or ~~~, closed by a longer-or-equal run).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.md"
    >>> _ = p.write_text("<!-- test: run -->\\n```bash\\necho hi\\n```\\n")
    >>> [(b.lang, b.code, b.marker) for b in blocks(p)]
    [('bash', 'echo hi\\n', 'run')]
    """
    lines, out, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        body, i = [], i + 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(m["indent"]):] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        lang = (m["info"].split() or [""])[0].lower()
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker["what"] if marker else ""))
        i += 1
    return out


def _python_files() -> list[Path]:
    return [p for p in DOCS if any(b.lang == "python" for b in blocks(p))]


def _shell_blocks() -> list:
    out = []
    for path in DOCS:
        for b in blocks(path):
            if b.lang in SHELLS and b.marker.startswith("run"):
                slow = b.marker.split()[1:] == ["slow"]
                out.append(pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow else []))
    return out


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_pasted(path, tmp_path, monkeypatch):
    """All python blocks of one file, in order, in one namespace, in an empty folder; no foreign warnings."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in blocks(path):
        if block.lang != "python":
            continue
        if block.marker.startswith("skip"):
            assert block.marker[4:].strip(), f"{block.id}: `<!-- test: skip -->` needs a reason"
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 - the docs' own code
            except Exception as error:
                pytest.fail(f"{block.id}: the block fails as pasted: {type(error).__name__}: {error}")
        foreign = [f"{w.category.__name__}: {w.message}" for w in caught if not str(w.message).startswith("growir")]
        assert not foreign, f"{block.id}: library warnings a reader would see: {foreign}"


@pytest.mark.parametrize("block", _shell_blocks())
def test_marked_shell_blocks_run(block):
    if "slow" in block.marker and os.environ.get("GROWIR_DOCS") != "all":
        pytest.skip("a slow block: runs with GROWIR_DOCS=all (make test-long)")
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.id} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def test_markers_are_known():
    """A typo in a marker would silently skip a block."""
    for path in DOCS:
        for b in blocks(path):
            if b.marker:
                assert re.fullmatch(r"run( slow)?|skip .+", b.marker), f"{b.id}: unknown marker {b.marker!r}"
                assert (b.lang in SHELLS) == b.marker.startswith("run") or b.marker.startswith("skip"), \
                    f"{b.id}: `{b.marker}` on a {b.lang or 'plain'} block"


# --- figures quoted in the docs come from the committed results files they name ------------------------------
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?(?![\w.]*\d)(?!\s*(?:min|s|h|ms|hours?|minutes?|seconds?)\b)")
LIST_ITEM = re.compile(r"\s*(?:[-*]|\d+\.)\s")
RESULTS = re.compile(r"benchmarks/results/[\w.-]+\.(?:md|json)")


def figures(text: str) -> list[str]:
    """Decimal figures (0.873, 54.8, 1.7e-07) in a text. Not figures: whole numbers (sizes, counts), growth
    specs (x1.5) and durations (26.0 min: how long a run took on some machine).

    >>> figures("deviation 0.873, x1.5, 54.8% of 1.7e-07; v1.2.3, 3 layers, 26.0 min, 2.5 s")
    ['0.873', '54.8', '1.7e-07']
    """
    return NUMBER.findall(text)


def _matches(figure: str, values: list[float]) -> bool:
    """The figure is one of the values as printed: equal after rounding to the figure's own precision."""
    mantissa, _, exp = figure.partition("e")
    step = 10.0 ** -len(mantissa.split(".")[1]) * (10.0 ** int(exp) if exp else 1.0)
    x = float(figure)
    return any(abs(v - x) <= step / 2 * (1 + 1e-9) for v in values)


def _paragraphs(path: Path):
    """(first line, text) of each paragraph, table or list item."""
    chunk, start = [], 1
    for i, line in enumerate(path.read_text().splitlines() + [""], 1):
        if chunk and LIST_ITEM.match(line):  # a list item starts a new chunk
            yield start, "\n".join(chunk)
            chunk = []
        if line.strip():
            chunk or (start := i)
            chunk.append(line)
        elif chunk:
            yield start, "\n".join(chunk)
            chunk = []


@pytest.mark.parametrize("path", [p for p in DOCS if RESULTS.search(p.read_text())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_come_from_the_results_files_named_beside_them(path):
    """A paragraph that names `benchmarks/results/X`, and the tables and paragraphs after it up to the next
    heading, quote only figures that X holds (as printed there, to the quoted precision). A list item covers
    itself only. Paragraphs that name no results file are not checked: README's savings line names the
    results folder only (its figures are branch `train`'s, from benchmarks/results/savings.md)."""
    wrong, sources = [], []
    for line, text in _paragraphs(path):
        if text.startswith("#") or LIST_ITEM.match(text):  # a list item speaks for itself only
            sources = []
        named = [ROOT / name for name in RESULTS.findall(text)]
        missing = [str(s.relative_to(ROOT)) for s in named if not s.is_file()]
        assert not missing, f"{path.name}:{line}: names {missing}, which is not committed"
        sources = named or sources
        if not sources:
            continue
        values = [float(m) for s in sources for m in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?",
                                                                  s.read_text())]
        wrong += [f"{path.name}:{line}: {f}" for f in figures(text) if not _matches(f, values)]
    assert not wrong, "figures not found in the results files their section names:\n" + "\n".join(wrong)
