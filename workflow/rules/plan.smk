# Stage 2: one job sees every manifest and decides every destination.


rule plan:
    input:
        manifests=batch_manifests(),
    output:
        plan=f"{STATE}/plan.parquet",
        csv=f"{STATE}/plan.csv",
        skipped=f"{STATE}/skipped.csv",
        removed=f"{STATE}/removed_sources.csv",
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
        # Registry of earlier placements and the recorded layout live beside the plan.
        state_dir=lambda wildcards, output: os.path.dirname(output.plan),
    shell:
        "{params.dcmsort} plan --manifests {input.manifests:q}"
        " --input-dir {params.input_dir:q} --output-dir {params.output_dir:q}"
        " --state-dir {params.state_dir:q} --naming {params.naming:q}"
        " --plan {output.plan:q} --plan-csv {output.csv:q} --skipped {output.skipped:q}"
        " --removed {output.removed:q}"
        " 2> {log:q}"
