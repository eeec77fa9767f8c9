# Stage 3: one job per partition sees its files and its part of the ledger, and decides
# where new files go.


rule plan:
    input:
        # The partition job's rows of this partition, or with one partition the batch
        # manifests themselves (no partition job: common.smk, partition_count).
        rows=plan_rows,
        check=plan_check,
    output:
        plan=f"{STATE}/plan/{{part}}-{{fingerprint}}.parquet",
        # Named by the target: a ledger removed by hand takes it along, and the next run
        # plans every file again (they are found on disk by content, not copied twice).
        ledger_marker=f"{STATE}/ledger/planned-{{part}}-{{fingerprint}}.txt",
        # The new files the filters leave out, with the rule: read by the report.
        excluded=f"{STATE}/excluded/{{part}}-{{fingerprint}}.parquet",
    log:
        f"{STATE}/logs/plan/{{part}}-{{fingerprint}}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        dcmsort=DCMSORT,
        # A function, so that the braces of the templates are not read as wildcards.
        naming=lambda wildcards: SETTINGS.naming_json,
        filters=lambda wildcards: SETTINGS.filters_json,
        input_dir=SETTINGS.input_dir,
        output_dir=SETTINGS.output_dir,
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output.plan)
        ),
        mode=SETTINGS.transfer_mode,
        routes=plan_routes,
    shell:
        "{params.dcmsort} plan --manifests {input.rows:q} --partition {wildcards.part}"
        " {params.routes}"
        " --input-dir {params.input_dir:q} --output-dir {params.output_dir:q}"
        " --state-dir {params.state_dir:q} --naming {params.naming:q}"
        " --plan {output.plan:q} --mode {params.mode} --log {log:q}"
        " --ledger-marker {output.ledger_marker:q} --filters {params.filters:q}"
        " --excluded {output.excluded:q} 2> {log:q}"
