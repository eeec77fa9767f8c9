"""Mutation check: break a promise on purpose, one place at a time, and see a test fail.

Each mutant names a source file, a short snippet of it (which must occur exactly once), the
text that replaces it, and the few tests that should notice. The script applies one mutant,
runs those tests, restores the file byte for byte (and its mtime), and reports:

- killed: a test failed (or timed out), as it should;
- SURVIVED: every test passed with the promise broken, so a test is missing;
- snippet not found / ambiguous: the code moved; refresh the mutant (not a failure unless
  --strict), which is why snippets are short and match one statement.

    python tools/mutate.py              # every mutant (a few minutes on 2 cores)
    python tools/mutate.py transfer     # mutants whose name contains 'transfer'
    python tools/mutate.py --list       # names, files, tests, whether each applies

Before the mutants, the tests they use are run once unmutated (skip with --no-baseline):
a test that fails anyway would kill every mutant and prove nothing. Exit code 0 when no
mutant survived, 1 when one did (or, with --strict, when a snippet was not found), 2 when
the baseline fails. A copy of the original is kept in .mutate-backup/ while a mutant is in
place, so even a killed run is undone by the next start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKUP = REPO / ".mutate-backup"

# Test selections, fast first: unit tests of the module, then one end-to-end run at most.
TRANSFER = "tests/test_transfer.py"
NAMING = "tests/test_naming.py"
SETTINGS = "tests/test_settings.py"
PLAN = "tests/test_plan.py"
E2E_SEED = (
    "tests/test_workflow.py::"
    "test_demo_data_is_sorted_into_the_seed_layout_and_the_input_is_untouched"
)
E2E_LINKS = "tests/test_workflow.py::test_link_modes_place_every_file"
E2E_NOOP = (
    "tests/test_incremental.py::test_a_rerun_with_nothing_new_opens_no_input_and_writes_nothing"
)


@dataclass(frozen=True)
class Mutant:
    name: str  # what the mutant breaks, as a user would notice it
    path: str  # relative to the checkout
    find: str  # occurs exactly once in the file
    replace: str
    tests: tuple[str, ...]


MUTANTS = [
    # --- transfer: a file reaches its destination whole, atomically, never over another ---
    Mutant(
        "transfer: no size check after a copy",
        "src/dcmsort/transfer.py",
        "if size != source_stat.st_size:",
        "if False:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: no checksum check with verify=checksum",
        "src/dcmsort/transfer.py",
        'if verify == "checksum" and file_digest(tmp) != file_digest(source):',
        "if False:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a copy overwrites a different file at its destination",
        "src/dcmsort/transfer.py",
        "                return PRESENT\n            raise occupied\n",
        "                return PRESENT\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a link overwrites (counts as present) a different file",
        "src/dcmsort/transfer.py",
        "if destination_state(source, destination, source_stat):",
        "if True:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a file of the same size but another mtime counts as already present",
        "src/dcmsort/transfer.py",
        "(dest_stat.st_size, dest_stat.st_mtime_ns)\n        == (source_stat.st_size, "
        "source_stat.st_mtime_ns)",
        "dest_stat.st_size == source_stat.st_size",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: symbolic links are relative to the working directory",
        "src/dcmsort/transfer.py",
        "os.symlink(source.absolute(), destination)",
        "os.symlink(source, destination)",
        (TRANSFER, E2E_LINKS),
    ),
    Mutant(
        "transfer: the input is moved instead of copied",
        "src/dcmsort/transfer.py",
        "size = copy_file(source, tmp, source_stat)",
        "size = os.replace(source, tmp) or source_stat.st_size",
        (TRANSFER, E2E_SEED),
    ),
    Mutant(
        "transfer: a failed transfer job exits 0",
        "src/dcmsort/transfer.py",
        "        return 1\n    return 0\n",
        "        return 0\n    return 0\n",
        (TRANSFER,),
    ),
    # --- fileops: atomic writes ---
    Mutant(
        "fileops: a write goes straight to its final name (not atomic)",
        "src/dcmsort/fileops.py",
        "tmp = temp_path_for(path)",
        "tmp = path",
        (TRANSFER,),
    ),
    Mutant(
        "fileops: a failed write leaves its temporary file behind",
        "src/dcmsort/fileops.py",
        "        tmp.unlink(missing_ok=True)\n        raise",
        "        raise",
        (TRANSFER,),
    ),
    Mutant(
        "fileops: a copy does not keep the source's mtime (reruns reopen or refuse it)",
        "src/dcmsort/fileops.py",
        "os.utime(fd_out, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))",
        "pass",
        (TRANSFER, E2E_NOOP),
    ),
    Mutant(
        "fileops: the fallback copy (no copy_file_range) writes nothing",
        "src/dcmsort/fileops.py",
        "shutil.copyfileobj(src, dst, 1 << 20)",
        "pass",
        (TRANSFER,),
    ),
    # --- naming: every component safe, nothing escapes output_dir, nothing merges ---
    Mutant(
        "naming: '/' is no longer an unsafe character",
        "src/dcmsort/naming.py",
        """r'[<>:"/\\\\|?*""",
        """r'[<>:"\\\\|?*""",
        (NAMING,),
    ),
    Mutant(
        "naming: a component may start with a dot",
        "src/dcmsort/naming.py",
        '        and not name.startswith(".")\n',
        "",
        (NAMING,),
    ),
    Mutant(
        "naming: Windows device names are allowed",
        "src/dcmsort/naming.py",
        "not in _WINDOWS_RESERVED\n        and len(",
        "not in ()\n        and len(",
        (NAMING,),
    ),
    Mutant(
        "naming: components over 255 bytes are allowed",
        "src/dcmsort/naming.py",
        '        and len(name.encode("utf-8", "surrogatepass")) <= MAX_COMPONENT_BYTES\n',
        "",
        (NAMING,),
    ),
    Mutant(
        "naming: a cleaned value loses its hash (T1/T2 and T1:T2 merge)",
        "src/dcmsort/naming.py",
        "return _UNSAFE_CHARACTER.sub(REPLACEMENT, text) + MARKER + short_hash(text)",
        "return _UNSAFE_CHARACTER.sub(REPLACEMENT, text)",
        (NAMING,),
    ),
    Mutant(
        "naming: a header value is used unsanitised (a '/' in it adds folders)",
        "src/dcmsort/naming.py",
        "pieces.append(safe_value(text))",
        "pieces.append(text)",
        (NAMING,),
    ),
    Mutant(
        "naming: a template may use '..' or an absolute path",
        "src/dcmsort/naming.py",
        'if template.startswith("/") or any(part in ("..", ".")',
        'if False and any(part in ("..", ".")',
        (NAMING, SETTINGS),
    ),
    Mutant(
        "naming: text is not normalised to NFC",
        "src/dcmsort/naming.py",
        '    text = unicodedata.normalize("NFC", raw)\n    if not text:',
        "    text = raw\n    if not text:",
        (NAMING,),
    ),
    # --- settings: folders never nest, one run at a time, one layout per output ---
    Mutant(
        "settings: output_dir may lie inside input_dir",
        "src/dcmsort/settings.py",
        "if _inside(output_dir, input_dir):",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: input_dir may lie inside output_dir",
        "src/dcmsort/settings.py",
        "if _inside(input_dir, output_dir):",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a run may start inside input_dir (.snakemake/ in the input)",
        "src/dcmsort/settings.py",
        "if _inside(cwd, input_dir):",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: state_dir may lie inside input_dir",
        "src/dcmsort/settings.py",
        "if _inside(state_dir, input_dir):",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a second run on the same output is not locked out",
        "src/dcmsort/settings.py",
        "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "pass",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a changed layout is accepted for an existing output",
        "src/dcmsort/settings.py",
        "if key in recorded and recorded[key] != value:",
        "if False:",
        (SETTINGS,),
    ),
    # --- plan: placements stable, names never reused (plan.py is being rewritten) ---
    Mutant(
        "plan: two series share a folder although keep_series_apart",
        "src/dcmsort/plan.py",
        "while candidate in folder_owner and folder_owner[candidate] != key:",
        "while False:",
        (PLAN,),
    ),
    Mutant(
        "plan: a name already taken on disk is reused",
        "src/dcmsort/plan.py",
        "while destination in used_names or occupied(destination):",
        "while destination in used_names:",
        (PLAN,),
    ),
    Mutant(
        "plan: two files of this run may get one name",
        "src/dcmsort/plan.py",
        "while destination in used_names or occupied(destination):",
        "while occupied(destination):",
        (PLAN,),
    ),
    Mutant(
        "plan: earlier placements are forgotten (files may move)",
        "src/dcmsort/plan.py",
        "        earlier[(relpath, size, mtime)] = (action, destination)\n",
        "",
        (PLAN,),
    ),
]


def _restore_leftovers() -> list[str]:
    """Put back any original a killed earlier run left in .mutate-backup/."""
    restored = []
    if BACKUP.is_dir():
        for copy in sorted(p for p in BACKUP.rglob("*") if p.is_file()):
            target = REPO / copy.relative_to(BACKUP)
            shutil.copy2(copy, target)
            copy.unlink()
            restored.append(str(target.relative_to(REPO)))
        shutil.rmtree(BACKUP, ignore_errors=True)
    return restored


def run_tests(tests: tuple[str, ...], timeout: float) -> str:
    """'pass', 'fail' or 'timeout' for the tests, each run with fresh bytecode."""
    with tempfile.TemporaryDirectory(prefix="dcmsort-mutate-") as pycache:
        # A fresh bytecode cache: a mutant of the same size in the same second as the
        # source it replaced could otherwise run the original's cached bytecode.
        env = {**os.environ, "PYTHONPYCACHEPREFIX": pycache}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        try:
            proc = subprocess.run(
                [*command, *tests],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return "timeout"
    if proc.returncode == 0:
        return "pass"
    if proc.returncode == 1:
        return "fail"
    # 2-5: interrupted, internal or usage error, no tests collected: not a verdict.
    raise RuntimeError(f"pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}")


def applicability(mutant: Mutant) -> str | None:
    """Why the mutant cannot be applied to the current code (None when it can)."""
    try:
        count = (REPO / mutant.path).read_text(encoding="utf-8").count(mutant.find)
    except FileNotFoundError:
        return "file not found"
    if count != 1:
        return "snippet not found" if count == 0 else f"snippet ambiguous ({count} matches)"
    return None


def apply_and_test(mutant: Mutant, timeout: float) -> str:
    """The verdict for one mutant; the file is restored whatever happens."""
    problem = applicability(mutant)
    if problem:
        return problem
    path = REPO / mutant.path
    original = path.read_bytes()
    text = original.decode("utf-8")
    info = path.stat()
    backup = BACKUP / mutant.path
    backup.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, backup)
    try:
        path.write_text(text.replace(mutant.find, mutant.replace), encoding="utf-8")
        verdict = run_tests(mutant.tests, timeout)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        backup.unlink()
    return {"pass": "SURVIVED", "fail": "killed", "timeout": "killed (timeout)"}[verdict]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("match", nargs="*", help="run only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--strict", action="store_true", help="a missing snippet fails too")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.match or any(w in m.name for w in args.match)]
    if args.list:
        for m in mutants:
            state = applicability(m) or "applies"
            print(f"{m.name}\n    {m.path} ({state}); tests: {' '.join(m.tests)}")
        return 0
    for path in _restore_leftovers():
        print(f"restored {path} from a mutation run that was killed", file=sys.stderr)
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        print(f"baseline: {len(tests)} test selections, unmutated ...", flush=True)
        if run_tests(tests, args.timeout * 2) != "pass":
            print("baseline fails without any mutant: fix the tests first", file=sys.stderr)
            return 2
    results = []
    for mutant in mutants:
        started = time.monotonic()
        verdict = apply_and_test(mutant, args.timeout)
        results.append((mutant, verdict))
        print(f"{verdict:<28} {time.monotonic() - started:5.1f} s  {mutant.name}", flush=True)
    survived = [m for m, v in results if v == "SURVIVED"]
    missing = [m for m, v in results if v.startswith(("snippet", "file"))]
    killed = len(results) - len(survived) - len(missing)
    print(
        f"\n{killed} killed, {len(survived)} survived, {len(missing)} not applied "
        f"(snippet not found: refresh tools/mutate.py) of {len(results)} mutants"
    )
    for m in survived:
        print(f"  SURVIVED: {m.name} ({m.path}; tests: {' '.join(m.tests)})")
    return 1 if survived or (args.strict and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
