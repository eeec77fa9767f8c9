"""What the last run says about itself: the summary line, and marks on a report that is
not current (a run going on, failed, or stopped early). Standard library only: the
Snakefile's hooks import it at every run.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from dcmsort.fileops import atomic_path

HISTORY = "history.jsonl"  # one summary per run, appended: what changed since the last run
STATUS_START, STATUS_END = "<!--dcmsort-status-->", "<!--/dcmsort-status-->"
COMPLETE, RUNNING, FAILED, STALE = "complete", "running", "failed", "stale"
# The exit code of a run whose check left damage it could not restore (a job that failed
# gives Snakemake's 1): the report is complete and lists each damaged placement.
DAMAGE_LEFT = 3


def summary_line(summary_file: Path) -> str:
    """The one line printed at the end of a run."""
    try:
        s = json.loads(Path(summary_file).read_text())
    except (OSError, ValueError):
        return f"dcmsort: finished; no summary at {summary_file}"
    extra = ""
    if s.get("files_relinked"):
        extra += f", {s['files_relinked']:,} relinked (their input moved)"
    if s.get("sources_gone"):
        extra += f", {s['sources_gone']:,} sources gone (copies kept)"
    if s.get("gone_and_removed_from_output"):
        extra += (
            f", {s['gone_and_removed_from_output']:,} removed from the output by hand "
            "(their input is gone too)"
        )
    if s.get("dangling_links"):
        extra += f", {s['dangling_links']:,} links dangling (their input is gone)"
    if s.get("changed_during_run"):
        extra += f", {s['changed_during_run']:,} changed during the run (rerun to sort them)"
    check = s.get("check")
    if check:
        extra += f", checked {check['placements']:,} placements"
        if check["restored"]:
            extra += f": {check['restored']:,} restored"
        if check["damaged"]:
            extra += (
                f"{',' if check['restored'] else ':'} {check['damaged']:,} damaged "
                f"(see {Path(summary_file).parent / 'check.csv'})"
            )
    status = "" if s.get("status", COMPLETE) == COMPLETE else f" [{s['status']}]"
    return (
        f"dcmsort{status}: {s['files_sorted']:,} files sorted ({s['files_new']:,} new this "
        f"run), {s['duplicates']:,} duplicates, {s['conflicts']:,} conflicts, "
        f"{s['skipped']:,} skipped{extra} · report: {s['report']}"
    )


def damage_left(summary_file: Path) -> bool:
    """Did this run's check find damage it could not restore?"""
    try:
        check = json.loads(Path(summary_file).read_text()).get("check")
    except (OSError, ValueError):
        return False
    return bool(check and check.get("damaged"))


def mark(state_dir: Path, status: str, message: str) -> None:
    """Say at the top of an existing report and summary that they are not current."""
    state_dir = Path(state_dir)
    summary_file, page = state_dir / "summary.json", state_dir / "report.html"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return
    summary.update(status=status, status_message=message)
    with atomic_path(summary_file) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    try:
        text = page.read_text(encoding="utf-8")
    except OSError:
        return
    head, _, rest = text.partition(STATUS_START)
    _, _, tail = rest.partition(STATUS_END)
    banner = f"<p class='warn'><b>{html.escape(status)}:</b> {html.escape(message)}</p>"
    with atomic_path(page) as tmp:
        tmp.write_text(f"{head}{STATUS_START}{banner}{STATUS_END}{tail}", encoding="utf-8")


def status_of(state_dir: Path) -> str | None:
    try:
        return json.loads((Path(state_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


# --- history: appended, a torn last line tolerated ----------------------------------------


def last_history(path: Path) -> dict | None:
    """The newest complete entry; a torn line (a full disk during an append) is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def append_history(path: Path, entry: dict) -> None:
    """One write of one whole line (O_APPEND), after a newline if the last one was torn."""
    line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)
