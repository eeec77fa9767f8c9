# Stage 1: read headers, one job per batch of input folders, one manifest per folder.


rule extract:
    output:
        # The batch's fingerprint (names, sizes, mtimes of its files) is in the name: a
        # change in the input is a missing output, whatever .snakemake/ remembers (another
        # working directory, or none, sees it too).
        manifest=f"{STATE}/manifests/batch-{{batch}}-{{fingerprint}}.parquet",
    log:
        f"{STATE}/logs/extract/batch-{{batch}}-{{fingerprint}}.log",
    conda:
        CONDA_ENV
    threads: threads_per_batch
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        dcmsort=DCMSORT,
        input_dir=SETTINGS.input_dir,
        batches=BATCHES,
        keywords=",".join(SETTINGS.keywords),
        manifests=f"{STATE}/manifests/folders",
        # The state folder, from an output (not a fixed prefix: snakemake --lint).
        state_dir=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output.manifest)
        ),
    shell:
        "{params.dcmsort} headers --input-dir {params.input_dir:q}"
        " --batch {wildcards.batch} --batches {params.batches}"
        " --keywords={params.keywords:q} --manifests {params.manifests:q}"
        " --output {output.manifest:q} --log {log:q} --workers {threads}"
        " --state-dir {params.state_dir:q} 2> {log:q}"
