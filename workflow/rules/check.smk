# Stage 2a, only with the config key `check`: every placement the ledger holds is on disk
# and whole, or is restored from its input; what is not is listed (check.csv, the report).
# Before the plan, so that the plan decides against a whole tree.


rule check:
    output:
        # Named after the run (CHECK_RUN), so that every run asked to check does.
        results=f"{STATE}/check/{{run}}.parquet",
    log:
        f"{STATE}/logs/check/{{run}}.log",
    conda:
        CONDA_ENV
    threads: 4
    resources:
        mem_mb=2000,
        runtime=240,
    params:
        dcmsort=DCMSORT,
        input_dir=SETTINGS.input_dir,
        output_dir=SETTINGS.output_dir,
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output.results)
        ),
        how=SETTINGS.check or "size",
    shell:
        "{params.dcmsort} check --input-dir {params.input_dir:q}"
        " --output-dir {params.output_dir:q} --state-dir {params.state_dir:q}"
        " --how {params.how} --threads {threads} --results {output.results:q}"
        " --csv {params.state_dir:q}/check.csv 2> {log:q}"
