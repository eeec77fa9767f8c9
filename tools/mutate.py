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
LEDGER = "tests/test_ledger.py"
NAMING = "tests/test_naming.py"
SETTINGS = "tests/test_settings.py"
PLAN = "tests/test_plan.py"
# Unit tests first, one end-to-end run last (pytest -x stops at the first failure).
REPORT = "tests/test_report.py"
STATUS = "tests/test_status.py"
SCANNER = "tests/test_scanner.py"
LEDGER_E2E = "tests/test_ledger_e2e.py"
E2E_SEED = (
    "tests/test_workflow.py::"
    "test_demo_data_is_sorted_into_the_seed_layout_and_the_input_is_untouched"
)


@dataclass(frozen=True)
class Mutant:
    name: str  # what the mutant breaks, as a user would notice it
    path: str  # relative to the checkout
    find: str  # occurs exactly once in the file
    replace: str
    tests: tuple[str, ...]


TRANSFER_PY = "src/dcmsort/transfer.py"
PLAN_PY = "src/dcmsort/plan.py"
LEDGER_PY = "src/dcmsort/ledger.py"
REPORT_PY = "src/dcmsort/report.py"
STATUS_PY = "src/dcmsort/status.py"
SCANNER_PY = "src/dcmsort/scanner.py"
HEADERS_PY = "src/dcmsort/headers.py"
CHECK_PY = "src/dcmsort/check.py"
CHECK = "tests/test_check.py"
PARTITION_PY = "src/dcmsort/partition.py"
PARTITION = "tests/test_partition.py"
STATEFUL_PARTITIONS = "tests/test_stateful.py::test_state_across_runs_in_partitions"

MUTANTS = [
    # --- transfer: a file reaches its destination whole, checked, never over another ---
    Mutant(
        "transfer: no size check after a copy (a short copy is placed)",
        TRANSFER_PY,
        "if written != after.st_size:",
        "if False:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: no checksum check with verify=checksum",
        TRANSFER_PY,
        "if _digest_fd(fd_out) != digest:",
        "if False:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: no check of the source at its copy (a file changed since its header was read "
        "is placed)",
        TRANSFER_PY,
        "_check_version(after, row)  # changed since its header was read",
        "pass",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a link is made to a source that changed since the plan",
        TRANSFER_PY,
        "    try:\n        _check_version(info, row)\n    except SourceChanged:\n",
        "    try:\n        pass\n    except SourceChanged:\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: folders are opened through links (no O_NOFOLLOW)",
        TRANSFER_PY,
        "flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW",
        "flags = os.O_RDONLY | os.O_DIRECTORY",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a copy is renamed into place, replacing what is there",
        TRANSFER_PY,
        "        rename_no_replace(tmp, name, folder_fd)",
        "        os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a copy counts as placed when a different file holds its name",
        TRANSFER_PY,
        "    if not _existing_is_same(folder_fd, name, source, digest):\n"
        "        raise _occupied() from None\n",
        "    pass\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a link counts as present where a different file holds its name",
        TRANSFER_PY,
        "            if _existing_is_same(folder_fd, name, source, row.digest):\n"
        "                return PRESENT, row.digest, None\n",
        "            if True:\n                return PRESENT, row.digest, None\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a file of the same size counts as the same content",
        TRANSFER_PY,
        "return _digest_at(folder_fd, name) == wanted",
        "return True",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: any link at the destination counts as the source's",
        TRANSFER_PY,
        "return os.readlink(name, dir_fd=folder_fd) == os.path.abspath(source)",
        "return True",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: symbolic links are relative to the working directory",
        TRANSFER_PY,
        "os.symlink(os.path.abspath(source), name, dir_fd=folder_fd)",
        "os.symlink(source, name, dir_fd=folder_fd)",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: hardlink mode moves the input instead of linking it",
        TRANSFER_PY,
        "os.link(source, name, dst_dir_fd=folder_fd)",
        "os.rename(source, name, dst_dir_fd=folder_fd)",
        (TRANSFER, E2E_SEED),
    ),
    Mutant(
        "transfer: a copy does not keep the source's mtime",
        TRANSFER_PY,
        "os.utime(fd_out, ns=(after.st_atime_ns, after.st_mtime_ns))",
        "pass",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a failed copy leaves its temporary file behind",
        TRANSFER_PY,
        "            with contextlib.suppress(FileNotFoundError):\n"
        "                os.unlink(tmp, dir_fd=folder_fd)\n",
        "            pass\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: the ledger is appended before the files are placed",
        TRANSFER_PY,
        "    tree = OutputTree(output_dir)\n    progress = ",
        "    ledger.append(state_dir, _ledger_rows([Outcome(r, COPIED) for r in placing], "
        "plan, mode))\n    tree = OutputTree(output_dir)\n    progress = ",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a changed or failed row is committed to the ledger",
        TRANSFER_PY,
        "    done = [o for o in outcomes if o.status in COMMITTED]\n",
        "    done = list(outcomes)\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a rerun of the plan commits rows the ledger already holds",
        TRANSFER_PY,
        'pending = ledger.rows_by_key(plan, committed, keep="missing")',
        "pending = plan",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a duplicate is committed though its destination was not placed",
        TRANSFER_PY,
        "if committed(row) and row.destination not in unplaced_now and tree.holds(",
        "if committed(row) and tree.holds(",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a duplicate of a committed placement is committed though it is gone",
        TRANSFER_PY,
        "and row.destination not in unplaced_now and tree.holds(row.destination):",
        "and row.destination not in unplaced_now:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a failed transfer job exits 0",
        TRANSFER_PY,
        "        return 1\n    return 0\n",
        "        return 0\n    return 0\n",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a failed transfer keeps its plan (the next run retries the same names)",
        TRANSFER_PY,
        "args.plan.unlink(missing_ok=True)",
        "pass",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: settle removes a user's file at the untokened temporary name",
        TRANSFER_PY,
        "if token and (temp := temp_name_for(name, token)) in names:",
        "if token and (temp := temp_name_for(name)) in names:",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: a new folder's mode is read from a parent another thread may be making",
        TRANSFER_PY,
        "os.fchmod(child, self.folder_mode)",
        "os.fchmod(child, permissions.folder_mode(os.fstat(fd).st_mode, 0o022))",
        (
            "tests/test_permissions.py::"
            "test_the_transfer_makes_folders_with_the_output_folders_mode_in_any_folder",
        ),
    ),
    # --- fileops: atomic writes, the copy fallback ---
    Mutant(
        "fileops: a write goes straight to its final name (not atomic)",
        "src/dcmsort/fileops.py",
        "tmp = temp_path_for(path)",
        "tmp = path",
        (LEDGER,),
    ),
    Mutant(
        "fileops: a failed write leaves its temporary file behind",
        "src/dcmsort/fileops.py",
        "        tmp.unlink(missing_ok=True)\n        raise",
        "        raise",
        (LEDGER,),
    ),
    Mutant(
        "fileops: the fallback copy (no copy_file_range) writes nothing",
        "src/dcmsort/fileops.py",
        "view = view[os.write(fd_out, view) :]",
        "view = view[len(view) :]",
        (TRANSFER,),
    ),
    Mutant(
        "fileops: the fallback copy reads to the end of its input, past the planned size",
        "src/dcmsort/fileops.py",
        "chunk = os.read(fd_in, min(1 << 20, size - written))",
        "chunk = os.read(fd_in, 1 << 20)",
        (TRANSFER,),
    ),
    Mutant(
        "transfer: the input is opened blocking (a FIFO in its place hangs the job)",
        "src/dcmsort/transfer.py",
        "fd_in = os.open(source, os.O_RDONLY | os.O_NONBLOCK)",
        "fd_in = os.open(source, os.O_RDONLY)",
        (TRANSFER,),
    ),
    Mutant(
        "inventory: a walk not behind its manifest's fingerprint is used",
        "src/dcmsort/inventory.py",
        "batch_fingerprint(walks, filter_keywords) != fingerprint",
        "False",
        ("tests/test_walks.py",),
    ),
    # --- ledger: appends whole, never fatal to read, nothing lost or read twice ---
    Mutant(
        "ledger: an unreadable file breaks every later run",
        LEDGER_PY,
        "except (OSError, pa.ArrowException) as error:",
        "except () as error:",
        (LEDGER,),
    ),
    Mutant(
        "ledger: an append overwrites the previous segment",
        LEDGER_PY,
        "return max(numbers, default=0) + 1",
        "return 1",
        (LEDGER, TRANSFER),
    ),
    Mutant(
        "ledger: segments folded into a base are read again",
        LEDGER_PY,
        "after = base[0] if base else -1",
        "after = -1",
        (LEDGER,),
    ),
    Mutant(
        "ledger: compaction drops the newest segments",
        LEDGER_PY,
        "number = segments[-1][0]",
        "number = segments[0][0]",
        (LEDGER,),
    ),
    Mutant(
        "ledger: a file replaced with the same size and its old mtime is the old version",
        LEDGER_PY,
        'SOURCE_KEY = ["relpath", "size", "mtime_ns", "ctime_ns", "ino"]',
        'SOURCE_KEY = ["relpath", "size", "mtime_ns"]',
        (
            LEDGER,
            f"{LEDGER_E2E}::test_a_file_replaced_with_the_same_size_and_its_old_mtime_is_sorted",
        ),
    ),
    Mutant(
        "headers: a file rewritten in place keeps the header of its old content",
        HEADERS_PY,
        'held = ledger.rows_by_key(versions, linked, keep="found")',
        "held = versions",
        (f"{LEDGER_E2E}::test_a_file_replaced_with_the_same_size_and_its_old_mtime_is_sorted",),
    ),
    Mutant(
        "transfer: the run after a hardlink run hashes every linked input",
        TRANSFER_PY,
        "    if not relinked:\n        return rows\n",
        "    if True:\n        return rows\n",
        (f"{LEDGER_E2E}::test_a_rerun_after_a_hardlink_run_reads_no_input_again",),
    ),
    Mutant(
        "workflow: a run after the ledger was removed says nothing new",
        "workflow/rules/common.smk",
        "        *ledger_markers(),\n",
        "",
        (f"{LEDGER_E2E}::test_a_run_after_the_ledger_was_removed_finds_every_sorted_file_again",),
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
        "return _UNSAFE_CHARACTER.sub(REPLACEMENT, stem) + MARKER + short_hash(text) + ext",
        "return _UNSAFE_CHARACTER.sub(REPLACEMENT, stem) + ext",
        (NAMING,),
    ),
    Mutant(
        "naming: a header value is used unsanitised (a '/' in it adds folders)",
        "src/dcmsort/naming.py",
        'safe = safe_value(text, keep_extension=keyword == "filename")',
        "safe = text",
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
        "settings: state_dir may lie in the sorted tree (state files replace sorted ones)",
        "src/dcmsort/settings.py",
        "if _inside(state_dir, output_dir) and not _in_hidden_folder(state_dir, output_dir):",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a state_dir reached through a link inside the output is followed",
        "src/dcmsort/settings.py",
        "link = _first_link_inside(state_dir, output_dir)",
        "link = None",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a state_dir holding someone else's files is written into",
        "src/dcmsort/settings.py",
        "foreign = _foreign_file(state_dir)",
        "foreign = None",
        (SETTINGS,),
    ),
    Mutant(
        "settings: one state_dir may describe two outputs",
        "src/dcmsort/settings.py",
        "if described is not None and described != output_dir:",
        "if False:",
        (SETTINGS,),
    ),
    Mutant(
        "settings: a state inside the output records its real path (a moved output is refused)",
        "src/dcmsort/settings.py",
        "if _inside(state_dir, output_dir)\n        else str(output_dir)",
        "if False\n        else str(output_dir)",
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
    # --- plan: only new versions, content by digest, names never reused, stable folders ---
    Mutant(
        "plan: every file is planned again, not only versions the ledger lacks",
        PLAN_PY,
        'return ledger.rows_by_key(dicom, committed, keep="missing")',
        "return dicom",
        (PLAN,),
    ),
    Mutant(
        "plan: same SOPInstanceUID and size count as the same content (no digest)",
        PLAN_PY,
        "            if content.digest == digest:\n                return content\n",
        "            return content\n",
        (PLAN,),
    ),
    Mutant(
        "plan: a new file version is never compared with placed contents (touch = new copy)",
        PLAN_PY,
        "if self.contents.candidates(sop, size):",
        "if False:",
        (PLAN,),
    ),
    Mutant(
        "plan: a file of the same size on disk is adopted as this file's copy",
        PLAN_PY,
        "return digest is not None and self.disk.digest(destination) == digest",
        "return True",
        (PLAN,),
    ),
    Mutant(
        "plan: a copy of a gone input's content is a duplicate, not present",
        PLAN_PY,
        "action = DUPLICATE if twin.live else PRESENT",
        "action = DUPLICATE",
        (PLAN,),
    ),
    Mutant(
        "plan: names on disk are ignored (a taken name is reused)",
        PLAN_PY,
        "taken = dict(self.disk.children(folder))",
        "taken = {}",
        (PLAN,),
    ),
    Mutant(
        "plan: names the ledger holds are ignored",
        PLAN_PY,
        "            for name in self.ledger_names(folder):\n"
        "                taken.setdefault(fold(name), (name, Disk.FILE))\n",
        "",
        (PLAN,),
    ),
    Mutant(
        "plan: a file or link where a folder must go is used as the folder",
        PLAN_PY,
        "if held[1] == Disk.DIR:",
        "if True:",
        (PLAN,),
    ),
    Mutant(
        "plan: names are compared without case folding",
        "src/dcmsort/naming.py",
        "decomposed.upper().casefold()",
        "decomposed",
        (NAMING,),
    ),
    Mutant(
        "plan: two series share a folder although keep_series_apart",
        PLAN_PY,
        "keep_apart = self.settings.keep_series_apart",
        "keep_apart = False",
        (PLAN,),
    ),
    # --- report and status: the truth about the output, escaped, honest when stale ---
    Mutant(
        "report: sources still present count as gone",
        REPORT_PY,
        'placed.filter(pc.invert(pc.is_in(placed["destination"], value_set=alive)))',
        'placed.filter(pc.is_in(placed["destination"], value_set=alive))',
        (REPORT,),
    ),
    Mutant(
        "report: placements are counted live whatever the input holds now",
        REPORT_PY,
        "live_rows = ledger.live(committed, files)",
        "live_rows = committed",
        (REPORT,),
    ),
    Mutant(
        "report: dangling links are not told apart",
        REPORT_PY,
        "if not (output_dir / d).exists()}",
        "if (output_dir / d).exists()}",
        (REPORT,),
    ),
    Mutant(
        "report: duplicates of inputs that are gone are still counted",
        REPORT_PY,
        "duplicates = live_rows.filter(",
        "duplicates = committed.filter(",
        (REPORT,),
    ),
    Mutant(
        "report: chart labels (header values) are not escaped",
        REPORT_PY,
        "<span class='label'>{html.escape(label)}</span>",
        "<span class='label'>{label}</span>",
        (REPORT,),
    ),
    Mutant(
        "report: table cells (file names, header values) are not escaped",
        REPORT_PY,
        "html.escape('' if v is None else str(v))",
        "('' if v is None else str(v))",
        (REPORT,),
    ),
    Mutant(
        "status: a torn history line hides every earlier entry",
        STATUS_PY,
        "        except ValueError:\n            continue\n",
        "        except ValueError:\n            return None\n",
        (STATUS,),
    ),
    Mutant(
        "status: an entry appended after a torn line joins it",
        STATUS_PY,
        'line = b"\\n" + line',
        "pass",
        (STATUS,),
    ),
    Mutant(
        "status: mark leaves summary.json saying complete",
        STATUS_PY,
        "summary.update(status=status, status_message=message)",
        "pass",
        (STATUS,),
    ),
    Mutant(
        "status: the banner's message is not escaped",
        STATUS_PY,
        "{html.escape(message)}</p>",
        "{message}</p>",
        (STATUS,),
    ),
    # --- headers: the scanner reads what pydicom reads, or leaves the file to pydicom ---
    Mutant(
        "headers: a value stored with another VR than the dictionary's is scanned anyway",
        SCANNER_PY,
        "if vr is not None and vr.decode() != wanted.dataset[tag][1]:",
        "if False:",
        (SCANNER,),
    ),
    Mutant(
        "headers: an item of a sequence is skipped by the wrong length",
        SCANNER_PY,
        "            pos += length\n",
        "            pos += length + 2\n",
        (SCANNER,),
    ),
    Mutant(
        "headers: text in any character set is decoded as UTF-8",
        HEADERS_PY,
        "codec = _CODECS.get(character_set)",
        'codec = "UTF8"',
        (SCANNER,),
    ),
    # --- check: a placement changed by hand is found, restored only from its content ---
    Mutant(
        "check: a truncated copy passes as whole",
        CHECK_PY,
        "if info.st_size != placement.size:",
        "if False:",
        (CHECK,),
    ),
    Mutant(
        "check: a copy is restored from an input touched since, without a known digest",
        CHECK_PY,
        "if digest is None and not source.holds(info):",
        "if False:",
        (CHECK,),
    ),
    Mutant(
        "check: the damaged file is renamed aside over an earlier one",
        CHECK_PY,
        "            rename_no_replace(name, aside, folder_fd)\n",
        "            os.rename(name, aside, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)\n",
        (CHECK,),
    ),
    Mutant(
        "check: checksum compares nothing",
        CHECK_PY,
        'return None if digest == placement.digest else Finding(placement, "content differs")',
        "return None",
        (CHECK,),
    ),
    # --- partitions: every claimant of a name meets its rivals in one job ---------------
    Mutant(
        "partition: the key of a file is its input path, not its patient folder (twins apart)",
        PARTITION_PY,
        'table = with_schema(table.append_column("part_key", keys(table, settings)), schema)',
        'table = with_schema(table.append_column("part_key", pa.array([key(r) for r in '
        'table["relpath"].to_pylist()], pa.int64())), schema)',
        (STATEFUL_PARTITIONS,),
    ),
    Mutant(
        "partition: names that differ only in case get different keys",
        PARTITION_PY,
        "fold(top_folder).encode(",
        "top_folder.encode(",
        (PARTITION,),
    ),
    Mutant(
        "ledger: a partition does not see rows another partition count wrote",
        LEDGER_PY,
        '        whole = part is None or group in ("", part.name)\n',
        '        whole = part is None or group in ("", part.name)\n'
        "        if not whole:\n            continue\n",
        (PARTITION,),
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
