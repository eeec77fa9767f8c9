"""How to run this checkout's workflow from Python: the tests and the benchmark use it."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # src/dcmsort/ -> the checkout
SNAKEFILE = REPO / "Snakefile"


def snakemake_command(
    workdir: Path, *flags: str, cores: int | str | None = 2, **config: object
) -> list[str]:
    """The command line of one dcmsort run (config holds input_dir, output_dir, ...).
    Flags go before ``--config``: after it, Snakemake would read them as config values.
    ``cores=None``: the profile's (the default profile: all)."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *(["--cores", str(cores)] if cores is not None else []),
        *flags,
        "--config",
        *(f"{k}={v}" for k, v in config.items()),
    ]
