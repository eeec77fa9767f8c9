# dcmsort: `snakemake` in this folder (or -s path/to/Snakefile) runs workflow/Snakefile.
# Its default target stays the default (an include: directive would drop it).
workflow.include("workflow/Snakefile", overwrite_default_target=True)
