# Stage 2: one job sees every manifest and the ledger, and decides where new files go.


rule plan:
    input:
        manifests=batch_manifests,
        # With `check`: after the check has made the tree whole again.
        check=check_results,
    output:
        plan=f"{STATE}/plan.parquet",
        csv=f"{STATE}/plan.csv",
        skipped=f"{STATE}/skipped.csv",
        # Named by the target: a ledger removed by hand takes it along, and the next run
        # plans every file again (they are found on disk by content, not copied twice).
        ledger_marker=f"{STATE}/ledger/planned.txt",
    log:
        f"{STATE}/logs/plan.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        dcmsort=DCMSORT,
        # A function, so that the braces of the templates are not read as wildcards.
        naming=lambda wildcards: SETTINGS.naming_json,
        input_dir=SETTINGS.input_dir,
        output_dir=SETTINGS.output_dir,
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(output.plan),
        mode=SETTINGS.transfer_mode,
    shell:
        "{params.dcmsort} plan --manifests {input.manifests:q}"
        " --input-dir {params.input_dir:q} --output-dir {params.output_dir:q}"
        " --state-dir {params.state_dir:q} --naming {params.naming:q}"
        " --plan {output.plan:q} --plan-csv {output.csv:q} --skipped {output.skipped:q}"
        " --mode {params.mode} --ledger-marker {output.ledger_marker:q}"
        " 2> {log:q}"
