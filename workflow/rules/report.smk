# Stage 5: what is in place and what this run did, for people (HTML) and programs (JSON).


rule report:
    input:
        transfers=transfer_results,
        plans=partition_plans,
        excluded=excluded_lists,
        manifests=batch_manifests,
        check=check_results,
    output:
        html=report(
            f"{STATE}/report.html",
            caption="../report/summary.rst",
            category="Summary",
        ),
        summary=f"{STATE}/summary.json",
        removed=f"{STATE}/removed_sources.csv",
        plan_csv=f"{STATE}/plan.csv",
        skipped=f"{STATE}/skipped.csv",
        patients=f"{STATE}/patients.csv",
        series=f"{STATE}/series.csv",
        catalog=f"{STATE}/catalog.parquet",
        catalog_csv=f"{STATE}/catalog.csv",
    log:
        f"{STATE}/logs/report.log",
    # In the rule, not a localrules: list (a module's list keeps the names unprefixed).
    localrule: True
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dcmsort=DCMSORT,
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(output.summary),
        output_dir=SETTINGS.output_dir,
        mode=SETTINGS.transfer_mode,
        # A function, so that the braces of the templates are not read as wildcards.
        naming=lambda wildcards: SETTINGS.naming_json,
        catalog_tags=SETTINGS.catalog_tags,
    shell:
        "{params.dcmsort} report --transfers {input.transfers:q} --plans {input.plans:q}"
        " --excluded {input.excluded:q}"
        " --plan-csv {output.plan_csv:q} --skipped {output.skipped:q}"
        " --manifests {input.manifests:q} --state-dir {params.state_dir:q}"
        " --output-dir {params.output_dir:q} --mode {params.mode}"
        " --html {output.html:q} --summary {output.summary:q}"
        " --removed {output.removed:q} --check {input.check:q}"
        " --patients {output.patients:q} --series {output.series:q}"
        " --catalog {output.catalog:q} --catalog-csv {output.catalog_csv:q}"
        " --catalog-tags {params.catalog_tags:q}"
        " --naming {params.naming:q} 2> {log:q}"
