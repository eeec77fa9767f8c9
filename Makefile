# Two commands do all set-up on a machine with Python 3.11 and pip:
#   make demo   install, generate the demo data, sort it, say where the result is
#   make test   install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CORES ?= all

.PHONY: install install-slurm demo test test-slurm lint format mutate bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)

# The SLURM executor plugin is kept out of the default install: when it is installed, every
# snakemake start runs `scontrol show config`, which blocks ~9 s where slurm-client is
# installed but no controller answers (and costs ~0.3 s everywhere else).
install-slurm: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[slurm]"

# The demo data is generated once; run `make demo` again to see an incremental no-op run.
# config/demo.yaml adds a fallback and a filter to the defaults (`make clean` first if an
# older demo/Classified was sorted with the plain default template: its layout is kept).
demo: $(INSTALLED)
	@test -d demo/Unclassified || $(BIN)/python -m dcmsort.demo demo/Unclassified --messy
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml --config input_dir=demo/Unclassified output_dir=demo/Classified
	@echo
	@echo "Sorted tree:  demo/Classified/  (a series without a description is named by its modality: DOE^JOHN_12345/RTSTRUCT_901)"
	@echo "Report:       demo/Classified/.dcmsort/report.html  (open it in a browser)"
	@echo "This run:     demo/Classified/.dcmsort/plan.csv (its decisions), skipped.csv (why not sorted; localizers: left out by the filter in config/demo.yaml)"
	@echo "A file:       $(BIN)/dcmsort where demo/Classified demo/Unclassified/loose.dcm"

# One pytest worker per core (-n auto): the end-to-end tests are Snakemake runs that keep
# about one core busy each, so two workers take the suite from ~18 to ~8 minutes on 2 cores.
test: $(INSTALLED)
	$(BIN)/python -m pytest -n auto --durations=20

# Needs a running SLURM (tests/slurm/cluster.sh start, as root); .ci/run does that.
test-slurm: install-slurm
	$(BIN)/python -m pytest -m slurm

lint: $(INSTALLED)
	$(BIN)/ruff check src tests bench tools workflow/scripts
	$(BIN)/ruff format --check src tests bench tools workflow/scripts
	$(BIN)/snakefmt --check Snakefile workflow/Snakefile workflow/rules
	$(BIN)/snakemake --lint --config input_dir=src output_dir=/tmp/dcmsort-lint

format: $(INSTALLED)
	$(BIN)/ruff format src tests bench tools workflow/scripts
	$(BIN)/ruff check --fix src tests bench tools workflow/scripts
	$(BIN)/snakefmt Snakefile workflow/Snakefile workflow/rules

# Breaks each invariant-guarding statement on purpose, one at a time, and reports any mutant
# that no test notices (MUTATE_ARGS: e.g. `transfer`, `--list`, `--strict`).
mutate: $(INSTALLED)
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

# Not a test: generates data, compares with cp -r, a header-read floor and dcm2niix.
bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf demo .snakemake bench/out
