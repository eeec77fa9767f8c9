# Stage 1: read headers, one job per batch of input folders, one manifest per folder.


rule extract:
    output:
        manifest=f"{STATE}/manifests/batch-{{batch}}.parquet",
    log:
        f"{STATE}/logs/extract/batch-{{batch}}.log",
    threads: threads_per_batch
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        dcmsort=DCMSORT,
        # Not used by the command: a change makes Snakemake rerun this batch (params trigger).
        fingerprint=lambda wildcards: batch_fingerprint(wildcards.batch),
        input_dir=SETTINGS.input_dir,
        batches=BATCHES,
        keywords=",".join(SETTINGS.keywords),
        manifests=f"{STATE}/manifests/folders",
    shell:
        "{params.dcmsort} headers --input-dir {params.input_dir:q}"
        " --batch {wildcards.batch} --batches {params.batches}"
        " --keywords {params.keywords:q} --manifests {params.manifests:q}"
        " --output {output.manifest:q} --workers {threads} 2> {log:q}"
