# Config validation, folder discovery and input functions shared by the rules.
import logging
import shlex
import sys
import threading
import time
from functools import cache
from pathlib import Path

from snakemake.common import NOTHING_TO_BE_DONE_MSG
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from snakemake.sourcecache import LocalSourceFile

# Where this workflow's own files are: this file's folder, two levels down. Not
# workflow.basedir, which is the main Snakefile's folder (another workflow's when dcmsort
# is used as a module). A module from a git host (github(...), as snakedeploy writes it)
# has no checkout on disk: its code is the installed dcmsort package of the same version.
RULES_DIR = workflow.current_basedir
REPO = (
    Path(RULES_DIR.get_path_or_uri(secret_free=True)).parents[1]
    if isinstance(RULES_DIR, LocalSourceFile)
    else None
)
if REPO is not None:
    sys.path.insert(0, str(REPO / "src"))
# Snakemake runs only the main Snakefile's onstart, onsuccess and onerror (below).
AS_MODULE = not workflow.modifier.is_main_snakefile()

try:
    from dcmsort import inventory, naming, permissions, routes, settings
    from dcmsort import progress, status
except ImportError:
    sys.exit(
        f"dcmsort: error: the workflow at {RULES_DIR.get_path_or_uri(secret_free=True)} "
        "needs the dcmsort package of the same version in the environment that runs "
        "Snakemake (pip install dcmsort from that release), or a local checkout as the "
        "module's snakefile"
    )


def record_params_without_pandas():
    """Snakemake records each job's params (.snakemake/metadata) with a serialiser that
    imports pandas whenever it is importable, to hash DataFrame params: ~0.4 CPU-s of
    every run's main process, full or no-op (the project installs pandas for
    dcmsort.tables). No param of dcmsort's rules is a pandas object, and for any other
    value both serialisers write repr(value): the metadata is the same, and no job reruns
    for it. Not as a module: the outer workflow's params may be DataFrames. A Snakemake
    without this serialiser (or with it elsewhere) runs as before."""
    import snakemake.persistence

    # The class that holds it: PersistenceBase in Snakemake 9.27, Persistence earlier.
    for name in ("PersistenceBase", "Persistence"):
        base = getattr(snakemake.persistence, name, None)
        if isinstance(
            vars(base or object).get("_serialize_param"), property
        ) and hasattr(base, "_serialize_param_builtin"):
            base._serialize_param = property(lambda self: self._serialize_param_builtin)


if not AS_MODULE:
    record_params_without_pandas()


def fail(message):
    """Stop with one line on stderr, never a traceback; a refused run leaves no log."""
    settings.discard_logs(workflow.logger_manager.get_logfile())
    sys.exit(f"dcmsort: error: {message}")


try:
    # Snakemake reads --config values as YAML: folder_template={PatientID} is a mapping.
    # A module's config is what the outer workflow gives it, not the command line's.
    given = {} if AS_MODULE else workflow.config_settings.overwrite_config
    config.update(settings.from_command_line(config, given))
    validate(config, schema="../schemas/config.schema.yaml")
except settings.ConfigError as error:
    fail(error)
except WorkflowError as error:
    # The jsonschema ValidationError, if there is one, carries the key and the value.
    fail(settings.schema_message(error.__context__ or error))
try:
    SETTINGS = settings.resolve(config)
    settings.check_layout(
        SETTINGS.state_dir / "layout.json", SETTINGS.naming, SETTINGS.output_dir
    )
except settings.ConfigError as error:
    fail(error)
# Patient data: nothing this run (or Snakemake for it) creates is more open than output_dir.
# Here, so every job inherits it, also on a cluster where each job parses this file again.
permissions.narrow_umask(SETTINGS.output_dir, SETTINGS.input_dir)

# Every job runs `python workflow/scripts/dcmsort_stage.py <stage> ...` from this checkout:
# with this very interpreter, or with the one of the job's conda environment (built from
# environment.yml) when Snakemake deploys them (--sdm conda).
CONDA_ENV = "../../environment.yml"
DCMSORT = " ".join(
    shlex.quote(str(part))
    for part in (
        (
            "python"
            if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
            else sys.executable
        ),
        # The checkout's own file: workflow.source_path gives a cached copy without src/,
        # which only a module from a git host needs (its jobs import the installed package).
        (
            REPO / "workflow" / "scripts" / "dcmsort_stage.py"
            if REPO is not None
            else workflow.source_path("../scripts/dcmsort_stage.py")
        ),
    )
)
STATE = str(SETTINGS.state_dir)
# Folders under STATE the rules write into: made in onstart with the state folder's mode
# (Snakemake would make them with the plain umask, closed to a sharing group).
STATE_FOLDERS = (
    "excluded",
    "ledger",
    "logs/extract",
    "logs/plan",
    "logs/transfer",
    "manifests/folders",
    "parts",
    "plan",
    "transfers",
    "walks",
)
if SETTINGS.check:
    STATE_FOLDERS += ("check", "logs/check")
# A run asked to check checks, whatever files earlier checks left: its results are named
# after this invocation (the time it started), so they are always missing at its start.
_started = time.time_ns()
CHECK_RUN = f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(_started // 10**9))}-{_started % 10**9:09d}"
FOLDERS = inventory.list_folders(SETTINGS.input_dir)
BATCHES = SETTINGS.batches or inventory.auto_batches(len(FOLDERS))
FOLDERS_OF_BATCH = {}
for _folder in FOLDERS:
    FOLDERS_OF_BATCH.setdefault(inventory.batch_of(_folder, BATCHES), []).append(
        _folder
    )


# The walk of each batch whose manifest is missing (its extract job will run), kept until
# onstart has made the state folder and writes it there for that job (inventory.walk_path):
# the input is stat-ed once per run, not again by the extract job.
WALKS_TO_WRITE = {}


# The number of files each batch's walk found (archives count as one file each).
FILES_OF_BATCH = {}


@cache
def batch_fingerprint(batch):
    """Names and versions of a batch's files (stat only): part of the name of the batch's
    manifest, so a change makes the extract job run again."""
    walks = inventory.walk_folders(SETTINGS.input_dir, FOLDERS_OF_BATCH[int(batch)])
    FILES_OF_BATCH[int(batch)] = sum(map(len, walks.values()))
    fingerprint = inventory.batch_fingerprint(walks, SETTINGS.filters.keywords)
    manifest = f"{STATE}/manifests/batch-{batch}-{fingerprint}.parquet"
    if not os.path.exists(manifest):
        WALKS_TO_WRITE[inventory.walk_path(manifest)] = inventory.dump_walk(
            walks, SETTINGS.filters.keywords
        )
    return fingerprint


def threads_per_batch(wildcards):
    """Cores for one extract job when every batch runs at once: few batches still use every
    core of a big workstation. On a cluster (no --cores) the profile's set-threads decides.
    """
    try:
        cores = workflow.cores
    except WorkflowError:
        cores = 1
    return max(1, cores // max(1, len(FOLDERS_OF_BATCH)))


def batch_manifests(wildcards=None):
    """The current manifest of every batch. An input function, so that the input is walked
    only when a plan or report job is in the DAG (not in each cluster job's own parse).
    """
    attach_handlers()
    return [
        f"{STATE}/manifests/batch-{b}-{batch_fingerprint(b)}.parquet"
        for b in sorted(FOLDERS_OF_BATCH)
    ]


def manifests_by_name(wildcards=None):
    """The batch manifests as the partition job reads them: by name alone (ancient), since
    their names (fingerprints) name its output (routes_key); a manifest rewritten under the
    same name (removed by hand and extracted again) holds the same rows."""
    return [ancient(manifest) for manifest in batch_manifests()]


@cache
def routes_key():
    """The name of the partition job's output: a digest of everything it reads (the batch
    manifests, named by their fingerprints; this run's check; the settings it applies,
    the filters among them, so that a change of filters plans every partition again).
    Snakemake takes an existing checkpoint output as current, so any change must be a
    missing file for the partition job to run again before the plans. With one partition
    it names the plan job's files in the same way (partition_jobs)."""
    inputs = [*batch_manifests(), *check_results(), str(SETTINGS.partitions)]
    rules = [SETTINGS.filters_json] if SETTINGS.filters else []
    key = routes.digest([*inputs, SETTINGS.naming_json, *rules])
    if partition_count() > 1 and routes.rows_missing(STATE, key):
        # Each partition's rows (parts/), removed by hand since the partition job ran:
        # a plan job that must run again would have no input. Another name makes the
        # partition job run again (and once more at the next run, back under its own
        # name: the rows are the same, so no plan runs for it).
        key = routes.digest([key, "rows written again"])
    return key


@cache
def partition_count():
    """How many partitions this run has: `partitions`, or with auto one per 250,000 files
    the walk found (an archive counts as one file), or 1 for a top-level folder not made of
    header values. Decided here, once, so that every job knows it from its partition's
    name: with 1 the plan job partitions the manifests itself (no partition job and no
    checkpoint: a job start less in every run, ~0.3 CPU-s, and a dry run shows every
    job); with more, the partition job (a checkpoint) writes each partition's rows."""
    if SETTINGS.partitions is not None:
        return SETTINGS.partitions
    if not naming.top_level_from_headers(SETTINGS.naming):
        return 1
    batch_manifests()  # walks every batch
    return routes.auto_partitions(sum(FILES_OF_BATCH.values()))


def partition_jobs():
    """``p<k>of<n>-<fingerprint>`` of every partition: known once the partition job ran,
    or with one partition from what the plan job reads (routes_key)."""
    if partition_count() == 1:
        return [f"{routes.Part(0, 1).name}-{routes_key()}"]
    done = checkpoints.partition.get(inputs=routes_key()).output.routes
    return [job for _, job in routes.jobs(done)]


def plans_partitions_itself(wildcards):
    """Does this plan job partition the manifests itself (the run has one partition)? Told
    by its partition's name, so that a cluster job knows it without walking the input.
    """
    return routes.parse_part(wildcards.part).count == 1


def plan_rows(wildcards):
    """What a plan job reads: its partition's rows, written by the partition job; with one
    partition, the batch manifests (by name, as the partition job reads them)."""
    if plans_partitions_itself(wildcards):
        return manifests_by_name()
    return f"{STATE}/{routes.PARTS}/{wildcards.part}-{wildcards.fingerprint}.parquet"


def plan_check(wildcards):
    """With one partition, the plan job comes after this run's check, as the partition job
    does otherwise."""
    return check_results() if plans_partitions_itself(wildcards) else []


def plan_routes(wildcards):
    """The plan job's --routes option with one partition: where it writes the routes."""
    if not plans_partitions_itself(wildcards):
        return ""
    routes_file = routes.routes_file(STATE, wildcards.fingerprint)
    return f"--routes {shlex.quote(str(routes_file))}"


def transfer_results(wildcards=None):
    return [f"{STATE}/transfers/{job}.parquet" for job in partition_jobs()]


def partition_plans(wildcards=None):
    return [f"{STATE}/plan/{job}.parquet" for job in partition_jobs()]


def excluded_lists(wildcards=None):
    """Each partition's files the filters left out, with the rule (for skipped.csv)."""
    return [f"{STATE}/excluded/{job}.parquet" for job in partition_jobs()]


def threads_per_partition(wildcards):
    """Cores for one transfer job when every partition's runs at once (on a cluster the
    profile's set-threads decides)."""
    try:
        cores = workflow.cores
    except WorkflowError:
        cores = 1
    return max(1, cores // routes.parse_part(wildcards.part).count)


def ledger_markers(wildcards=None):
    """Each partition's plan marker in the ledger folder: a ledger removed by hand takes
    them along, and every partition plans again."""
    return [f"{STATE}/ledger/planned-{job}.txt" for job in partition_jobs()]


def check_results(wildcards=None):
    """This run's check results, when it checks (config key `check`): the report reads
    them."""
    return [f"{STATE}/check/{CHECK_RUN}.parquet"] if SETTINGS.check else []


def get_final_output(wildcards=None):
    """The report, each batch's current manifest, each partition's plan marker in the
    ledger folder and this run's check: a manifest whose name (fingerprint) is new is
    missing, which makes the run start from its extract job; a marker removed with the
    ledger makes its partition plan again.
    Snakemake 9 runs a job for a missing intermediate file only when a job that needs it
    runs, so the target names them itself."""
    return [
        f"{STATE}/report.html",
        f"{STATE}/summary.json",
        *batch_manifests(),
        *ledger_markers(),
        *check_results(),
    ]


wildcard_constraints:
    batch=r"\d+",
    part=r"p\d+of\d+",
    inputs=r"[0-9a-f]{16}",
    fingerprint=r"[0-9a-f]{16}",
    run=r"\d{8}T\d{6}-\d{9}",


onstart:
    if workflow.is_main_process:
        try:
            permissions.prepare_run_folders(
                SETTINGS.input_dir,
                SETTINGS.output_dir,
                SETTINGS.state_dir,
                STATE_FOLDERS,
            )
            settings.acquire_run_lock(SETTINGS.state_dir)
        except settings.ConfigError as error:
            print(f"dcmsort: error: {error}", file=sys.stderr)
            os._exit(1)
        except OSError as error:
            print(
                f"dcmsort: error: {error.filename}: {error.strerror}",
                file=sys.stderr,
            )
            os._exit(1)
        # A local shell job's stdout is Snakemake's own: its progress lines reach the
        # console. A cluster job's is the scheduler's log file: there they stay in the
        # job's log alone (nothing floods a cluster log).
        if workflow.local_exec:
            os.environ[progress.CONSOLE_ENV] = "1"
        else:
            os.environ.pop(progress.CONSOLE_ENV, None)
        inventory.write_walks(SETTINGS.state_dir / "walks", WALKS_TO_WRITE)
        WALKS_TO_WRITE.clear()
        # Appended in place by each run's report: made with a state file's mode.
        permissions.create_state_file(SETTINGS.state_dir / status.HISTORY)
        # Until this run's report replaces it, the last one must not read as current,
        # even if this run is killed.
        status.mark(
            SETTINGS.state_dir,
            status.RUNNING,
            f"a run started {time.strftime('%Y-%m-%d %H:%M:%S')} has not finished (or was "
            "killed); the numbers below are from the run before it. Rerun to update them.",
        )


def stop_rate_limit_timers():
    """Snakemake starts a 1 s threading.Timer after each scheduling pass (its job rate
    limit, --max-jobs-per-timespan), and Python waits for the last one at exit: up to 1 s
    added to every run. Called once the run is over, when they have nothing left to do.
    """
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()


onsuccess:
    stop_rate_limit_timers()
    if status.status_of(STATE) == status.RUNNING:
        status.mark(
            STATE,
            status.STALE,
            "the last run stopped before the report stage (a partial target such as "
            "--until); the numbers below are from an earlier run. Rerun to update them.",
        )
    print(status.summary_line(Path(STATE) / "summary.json"), file=sys.stderr)
    if SETTINGS.check and status.damage_left(Path(STATE) / "summary.json"):
        # As fsck and restic check do: a run that leaves damage it found is not a success.
        # Raised here, after the report: Snakemake's own exit code would be 0.
        raise SystemExit(status.DAMAGE_LEFT)


def rewrite_report():
    """The report job's work, in this process: a run killed (or failed, or stopped early)
    left a report marked as not current, and a later run with nothing to do would
    otherwise never replace it."""
    from dcmsort.report import main as write_report

    if partition_count() == 1:
        # One partition's routes are written by its plan job, which has nothing to do
        # now: a run stopped after another count's partition job replaced them, and the
        # report (and dcmsort config, where, tables) would read that count's unrun plans.
        from dcmsort.partition import write_routes

        done = routes.routes_file(STATE, routes_key())
        write_routes(routes.one_partition(done), done)
    try:
        jobs = [job for _, job in routes.jobs(routes.current(STATE))]
    except (OSError, ValueError):
        jobs = []
    write_report(
        ["--transfers", *[f"{STATE}/transfers/{job}.parquet" for job in jobs]]
        + ["--plans", *[f"{STATE}/plan/{job}.parquet" for job in jobs]]
        + ["--excluded", *[f"{STATE}/excluded/{job}.parquet" for job in jobs]]
        + ["--plan-csv", rules.report.output.plan_csv]
        + ["--skipped", rules.report.output.skipped]
        + ["--manifests", *batch_manifests()]
        + ["--state-dir", STATE, "--output-dir", str(SETTINGS.output_dir)]
        + ["--mode", SETTINGS.transfer_mode, "--html", rules.report.output.html]
        + [
            "--summary",
            rules.report.output.summary,
            "--removed",
            rules.report.output.removed,
            "--naming",
            SETTINGS.naming_json,
        ]
    )


class NothingNewLine(logging.Handler):
    """The summary line of a run with nothing to do. Snakemake 9 calls neither onstart nor
    onsuccess then: Workflow.execute logs NOTHING_TO_BE_DONE_MSG and returns, so the line
    is printed when that message is logged (a dry run logs it too, and prints nothing).
    """

    def emit(self, record):
        if record.getMessage() == NOTHING_TO_BE_DONE_MSG and not workflow.dryrun:
            if status.status_of(STATE) not in (None, status.COMPLETE):
                rewrite_report()
            line = status.summary_line(Path(STATE) / "summary.json")
            line = line.replace("dcmsort: ", "dcmsort: nothing new; last run: ", 1)
            print(line.replace(" new this run)", " new in it)"), file=sys.stderr)


if workflow.is_main_process:
    logging.getLogger("snakemake.logging").addHandler(NothingNewLine())


onerror:
    stop_rate_limit_timers()
    status.mark(
        STATE,
        status.FAILED,
        f"the run of {time.strftime('%Y-%m-%d %H:%M:%S')} failed (see logs/); the numbers "
        "below are from an earlier run. Fix the cause and rerun.",
    )
    print(
        f"dcmsort: the run failed; each failed job's log is named above (all logs: "
        f"{STATE}/logs/). Inputs are untouched; fix the cause and rerun the same command.",
        file=sys.stderr,
    )


def run_before(handler, then):
    """dcmsort's handler (already given its log), then the outer workflow's."""

    def both(log):
        handler()
        then(log)

    both.dcmsort_handlers = {id(handler), *getattr(then, "dcmsort_handlers", ())}
    return both


def attach_handlers():
    """As a module: Snakemake calls the main Snakefile's onstart, onsuccess and onerror
    alone, and a run needs dcmsort's onstart (it makes the state folders and takes the run
    lock). So dcmsort's run first, then the outer workflow's. Called once the module is
    read, and again when the DAG is built (from batch_manifests): a handler the outer
    workflow declares after its module statement has replaced dcmsort's by then."""
    if not AS_MODULE:
        return
    for name, handler in (
        ("_onstart", onstart),
        ("_onsuccess", onsuccess),
        ("_onerror", onerror),
    ):
        current = getattr(workflow, name)
        if id(handler) not in getattr(current, "dcmsort_handlers", ()):
            setattr(workflow, name, run_before(handler, current))


attach_handlers()
