# Stage 2: split the manifests' rows into partitions of patient folders, one file each,
# named by a fingerprint of its rows: only partitions with new files get plan and transfer
# jobs. A checkpoint, since the partitions (and their names) are known only once it ran;
# its output is named by what it reads (routes_key), so that a change is a missing file.


checkpoint partition:
    input:
        manifests=manifests_by_name,
        # With `check`: the plans come after the check has made the tree whole again.
        check=check_results,
    output:
        routes=f"{STATE}/partitions-{{inputs}}.json",
    log:
        f"{STATE}/logs/partition-{{inputs}}.log",
    conda:
        CONDA_ENV
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        dcmsort=DCMSORT,
        # A function, so that the braces of the templates are not read as wildcards.
        naming=lambda wildcards: SETTINGS.naming_json,
        filters=lambda wildcards: SETTINGS.filters_json,
        input_dir=SETTINGS.input_dir,
        output_dir=SETTINGS.output_dir,
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(output.routes),
        mode=SETTINGS.transfer_mode,
        # Decided by the Snakefile (common.smk, partition_count): never 1 here.
        partitions=lambda wildcards: partition_count(),
    shell:
        "{params.dcmsort} partition --manifests {input.manifests:q}"
        " --input-dir {params.input_dir:q} --output-dir {params.output_dir:q}"
        " --state-dir {params.state_dir:q} --naming {params.naming:q}"
        " --filters {params.filters:q} --partitions {params.partitions} --mode {params.mode}"
        " --routes {output.routes:q} --log {log:q} 2> {log:q}"
