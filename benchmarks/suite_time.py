#!/usr/bin/env python
"""The test suite's time at two commits, test by test: is the code slower on the tests both commits run?

    python benchmarks/suite_time.py OLD_REV [NEW_REV] [--out benchmarks/results]
    python benchmarks/suite_time.py --parse OLD_DURATIONS.txt NEW_DURATIONS.txt OLD_REV NEW_REV

Each commit is checked out in a temporary worktree (``git worktree``; ``../shared`` linked beside it) and its
suite run as ``make test`` runs it (``pytest -n 2``, one thread per worker) with ``--durations=0``, under this
interpreter, with ``PYTHONPATH`` set to the worktree so that its own ``growir`` is imported (also by the CLI in
subprocesses), one commit after the other. A test is the same test at both commits when its name (function and
parameters, without the file: files moved in the layout change) is; the durations of a test's setup, call and
teardown are summed. Writes ``suite_time.json`` and ``suite_time.md``: the wall time of each suite, and the time
of the tests both ran. Whole-suite wall times differ with the tests each commit has; the shared tests compare the
code. Run it on a quiet machine: another process on the two cores moves both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LINE = re.compile(r"([\d.]+)s (?:call|setup|teardown)\s+\S+?::(\S+)")


def parse(text: str) -> dict[str, float]:
    """Seconds per test (setup + call + teardown) from pytest's ``--durations=0`` report, keyed by test name.

    >>> parse("1.50s call     tests/a/test_x.py::test_one[p]\\n0.25s setup    tests/test_x.py::test_one[p]\\n")
    {'test_one[p]': 1.75}
    """
    seconds: dict[str, float] = defaultdict(float)
    for m in LINE.finditer(text):
        seconds[m.group(2)] += float(m.group(1))
    return dict(seconds)


def ran(text: str) -> int:
    """How many tests ran: the outcome characters of pytest's quiet progress lines (``....s.F  [ 50%]``).

    >>> ran("bringing up nodes...\\n....s.F [ 50%]\\n.. [100%]\\n")
    9
    """
    return sum(len(m.group(1).replace(" ", "")) for m in re.finditer(r"^([.sFExX ]+)\s+\[\s*\d+%\]$", text, re.M))


def run_suite(rev: str) -> tuple[str, float]:
    """(pytest's output with --durations=0, wall seconds) of ``rev``'s suite in a fresh worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-f", "--detach", tree, rev], check=True,
                       capture_output=True)
        os.symlink(os.path.join(os.path.dirname(ROOT), "shared"), os.path.join(tmp, "shared"))
        try:
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            start = time.time()
            done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
                                   "--durations=0"], cwd=tree, env=env, capture_output=True, text=True)
            return done.stdout + done.stderr, time.time() - start
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


def compare(old: dict, new: dict, old_wall: float, new_wall: float, old_rev: str, new_rev: str,
            counts: tuple[int, int] = (0, 0)) -> dict:
    shared = sorted(set(old) & set(new))
    o, n = sum(old[k] for k in shared), sum(new[k] for k in shared)
    change = sorted(shared, key=lambda k: new[k] - old[k])
    return {"old": {"rev": old_rev, "ran": counts[0], "tests": len(old), "wall_s": round(old_wall), "test_s": round(sum(old.values()), 1)},
            "new": {"rev": new_rev, "ran": counts[1], "tests": len(new), "wall_s": round(new_wall), "test_s": round(sum(new.values()), 1)},
            "shared": {"tests": len(shared), "old_s": round(o, 1), "new_s": round(n, 1), "ratio": round(n / o, 3)},
            "faster": [[k, round(old[k], 2), round(new[k], 2)] for k in change[:10]],
            "slower": [[k, round(old[k], 2), round(new[k], 2)] for k in change[::-1][:10]]}


def markdown(r: dict) -> str:
    o, n, s = r["old"], r["new"], r["shared"]
    rows = "\n".join(f"| `{k}` | {a:.2f} | {b:.2f} |" for k, a, b in r["slower"] + r["faster"])
    return (f"# Test suite time, {o['rev']} → {n['rev']}\n\n"
            f"`python benchmarks/suite_time.py` (pytest -n 2, one thread per worker, 2 cores, one suite after the "
            f"other).\n\n| | {o['rev']} | {n['rev']} |\n|---|---|---|\n"
            f"| tests run | {o['ran']} | {n['ran']} |\n"
            f"| test names timed (0.005 s or more; parameters included) | {o['tests']} | {n['tests']} |\n| wall (s) | {o['wall_s']} | {n['wall_s']} |\n"
            f"| sum of test durations (s) | {o['test_s']} | {n['test_s']} |\n"
            f"| the {s['tests']} tests both run (s) | {s['old_s']} | {s['new_s']} |\n\n"
            f"On the tests both commits run, the new code takes {s['ratio']:.3f}× the old time.\n\n"
            f"The ten that slowed most and the ten that sped up most (seconds):\n\n| test | old | new |\n|---|---|---|\n"
            f"{rows}\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="+", help="OLD_REV [NEW_REV], or with --parse: OLD.txt NEW.txt OLD_REV NEW_REV")
    p.add_argument("--parse", action="store_true", help="compare two saved --durations=0 reports")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    if a.parse:
        texts = [open(path).read() for path in a.args[:2]]
        walls = [float(m.group(1)) if (m := re.search(r"^wall (\d+)", t, re.M)) else float("nan") for t in texts]
        old_rev, new_rev = a.args[2:4]
    else:
        old_rev, new_rev = a.args[0], a.args[1] if len(a.args) > 1 else "HEAD"
        (t_old, w_old), (t_new, w_new) = run_suite(old_rev), run_suite(new_rev)
        texts, walls = [t_old, t_new], [w_old, w_new]
    result = compare(parse(texts[0]), parse(texts[1]), walls[0], walls[1], old_rev, new_rev,
                     (ran(texts[0]), ran(texts[1])))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "suite_time.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "suite_time.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
