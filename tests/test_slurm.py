"""The cluster path, against a real SLURM of three nodes on this machine
(tests/slurm/cluster.sh start)."""

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from conftest import Sorter, assert_every_file_accounted_for, tree_snapshot
from dcmsort import demo
from dcmsort.runner import REPO

pytestmark = pytest.mark.slurm


def slurm_is_up() -> bool:
    if not shutil.which("sinfo") or not importlib.util.find_spec("snakemake_executor_plugin_slurm"):
        return False
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return probe.returncode == 0 and any(s in probe.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not slurm_is_up():
        if os.environ.get("DCMSORT_REQUIRE_SLURM"):
            pytest.fail(
                "SLURM is required here but not up: run tests/slurm/cluster.sh start "
                "and make install-slurm"
            )
        pytest.skip("no SLURM (tests/slurm/cluster.sh start, make install-slurm)")


def test_a_partitioned_cluster_run_gives_the_same_tree_as_a_local_run(tmp_path):
    source = tmp_path / "Unclassified"
    demo.generate(source, patients=6, series=2, instances=3)
    demo.generate_messy(source)
    local = Sorter(tmp_path / "work-local", source, tmp_path / "local")
    cluster = Sorter(tmp_path / "work-cluster", source, tmp_path / "cluster")
    for sorter in (local, cluster):
        sorter.workdir.mkdir()
    local.run(batches=3, partitions=1)
    cluster_options = (
        "--workflow-profile",
        str(REPO / "workflow" / "profiles" / "slurm"),
        "--slurm-status-command",
        "squeue",  # this test cluster has no slurmdbd
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-no-account",
        "--latency-wait",
        "5",
        "--max-threads",
        "1",  # each node of the test cluster has one CPU; a job asking more is refused
    )
    result = cluster.run(*cluster_options, batches=3, partitions=3, timeout=420)
    # "... SLURM jobid 12 (log: .../slurm_logs/rule_plan/part_p0of3.../12.log)"
    rule_of = dict(
        re.findall(r"SLURM jobid (\d+) \(log: [^)]*slurm_logs/rule_(\w+)/", result.output)
    )
    job_ids = list(rule_of)
    # 3 extract batches, the partition job, 3 plan and 3 transfer jobs
    assert sorted(rule_of.values()).count("plan") == 3, result.output[-3000:]
    assert sorted(rule_of.values()).count("transfer") == 3, result.output[-3000:]
    # SLURM's own record of where each job ran (kept for MinJobAge after the job ends).
    ran = subprocess.run(
        ["squeue", "-h", "--states=all", f"--jobs={','.join(job_ids)}", "-o", "%i %T %N"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    jobs = {job: (state, node) for job, state, node in (line.split() for line in ran if line)}
    assert {state for state, _ in jobs.values()} == {"COMPLETED"}, jobs
    nodes = {node for _, node in jobs.values()}
    assert len(nodes) > 1, f"every job ran on {nodes}: the jobs were not spread over nodes"
    # The work that grows with the data ran on more than one node too.
    for rule in ("plan", "transfer"):
        ran_on = {jobs[job][1] for job, name in rule_of.items() if name == rule}
        assert len(ran_on) > 1, f"every {rule} job ran on {ran_on}"
    assert_every_file_accounted_for(cluster)

    def sorted_tree(sorter):
        return {
            k: v[:2]
            for k, v in tree_snapshot(sorter.output_dir).items()
            if not k.startswith(".dcmsort")
        }

    assert sorted_tree(cluster) == sorted_tree(local)

    # New files, one partition: no partition job; the plan job, started by SLURM, finds its
    # shape from its partition's name and reads the manifests itself.
    demo.generate(source, patients=1, series=1, instances=2, first_patient=70)
    again = cluster.run(*cluster_options, batches=3, partitions=1, timeout=300)
    rules_run = set(re.findall(r"SLURM jobid \d+ \(log: [^)]*slurm_logs/rule_(\w+)/", again.output))
    assert rules_run == {"extract", "plan", "transfer"}, again.output[-3000:]
    assert cluster.summary()["files_new"] == 2
    assert_every_file_accounted_for(cluster)
