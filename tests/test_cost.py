"""Metadata calls per input file, counted with strace on a real run (not a timing).

On Lustre, GPFS or NFS every stat and every open is a round trip to a metadata server:
a change that adds one per file must fail here, not be found in production.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from syscalls import measure

pytestmark = pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed")


def test_a_full_run_stays_within_two_stats_and_three_opens_per_file(tmp_path):
    result = measure(tmp_path, folders=2, per_folder=20)

    def per_file(run: str, call: str) -> float:
        return sum(calls.get(call, (0, 0))[0] for calls in result[run].values())

    # One stat per file to fingerprint it, one fstat when its copy is checked; one open to
    # read its header, two to copy it (the input and the new file). The margin is for the
    # odd call a run makes once (a lazy import, a log) that lands in one count and not the
    # other; one call more per file is 1.0 more.
    assert per_file("full run", "stat") <= 2.1
    assert per_file("full run", "open") <= 3.1
    # A no-op rerun: the fingerprint's stat, and no input opened.
    assert per_file("no-op rerun", "stat") <= 1.1
    assert per_file("no-op rerun", "open") <= 0.1
