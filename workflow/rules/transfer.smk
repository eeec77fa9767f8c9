# Stage 4: carry out one partition's plan, atomically, never overwriting; commit to the
# ledger what is verifiably in place.


rule transfer:
    input:
        plan=rules.plan.output.plan,
    output:
        results=f"{STATE}/transfers/{{part}}-{{fingerprint}}.parquet",
    log:
        f"{STATE}/logs/transfer/{{part}}-{{fingerprint}}.log",
    conda:
        CONDA_ENV
    threads: threads_per_partition
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
        mode=SETTINGS.transfer_mode,
        verify=SETTINGS.verify,
    shell:
        "{params.dcmsort} transfer --plan {input.plan:q} --partition {wildcards.part}"
        " --input-dir {params.input_dir:q} --output-dir {params.output_dir:q}"
        " --state-dir {params.state_dir:q}"
        " --mode {params.mode} --verify {params.verify} --threads {threads}"
        " --results {output.results:q} --log {log:q} 2> {log:q}"
