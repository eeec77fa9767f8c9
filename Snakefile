# dcmsort: sort a dump of unorganised DICOM files into a clean tree.
# Table of contents only; the stages live in workflow/rules, the logic in src/dcmsort.
from snakemake.utils import min_version

min_version("9.0")


# Found beside this Snakefile from any working directory (--directory, tests, clusters).
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/check.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output,
