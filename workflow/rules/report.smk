# Stage 4: what happened, for people (HTML) and for programs (JSON).


localrules:
    report,


rule report:
    input:
        plan=rules.plan.output.plan,
        transfers=rules.transfer.output.results,
        removed=rules.plan.output.removed,
        manifests=batch_manifests(),
    output:
        html=report(
            f"{STATE}/report.html",
            caption="../report/summary.rst",
            category="Summary",
        ),
        summary=f"{STATE}/summary.json",
    log:
        f"{STATE}/logs/report.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dcmsort=DCMSORT,
        output_dir=SETTINGS.output_dir,
        mode=SETTINGS.transfer_mode,
    shell:
        "{params.dcmsort} report --plan {input.plan:q} --transfers {input.transfers:q}"
        " --removed {input.removed:q} --manifests {input.manifests:q}"
        " --output-dir {params.output_dir:q} --mode {params.mode}"
        " --html {output.html:q} --summary {output.summary:q} 2> {log:q}"
