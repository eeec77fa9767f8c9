# Stage 4: what happened, for people (HTML) and for programs (JSON).


localrules:
    report,


rule report:
    input:
        plan=rules.plan.output.plan,
        transfers=rules.transfer.output.results,
        manifests=batch_manifests(),
    output:
        html=report(
            f"{STATE}/report.html",
            caption="../report/summary.rst",
            category="Summary",
        ),
        summary=f"{STATE}/summary.json",
    params:
        state_dir=STATE,
        output_dir=SETTINGS.output_dir,
        mode=SETTINGS.transfer_mode,
    log:
        f"{STATE}/logs/report.log",
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "{PYTHON} -m dcmsort.report --plan {input.plan:q} --transfers {input.transfers:q}"
        " --manifests {input.manifests:q} --state-dir {params.state_dir:q}"
        " --output-dir {params.output_dir:q} --mode {params.mode}"
        " --html {output.html:q} --summary {output.summary:q} 2> {log:q}"
