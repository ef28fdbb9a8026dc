# The two commands of the README: `make demo` and `make test`; CI (.ci/run) adds
# `make test-workflow` (the tiny .test/ run) and `make lint`; `make test-plan-bare` plans in a
# venv holding only Snakemake.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.stevs-installed

.PHONY: install demo test test-workflow test-workflow-rerun test-slurm test-plan-bare lint clean \
	her2st her2st-effnet her2st-gpu

# Installs the versions the tests run with: envs/versions.txt (envs/generate.py writes it and
# envs/stevs.yaml from pyproject.toml) as pip constraints.
$(STAMP): pyproject.toml envs/versions.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "stevs needs Python >= 3.11: run 'make PYTHON=python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c envs/versions.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the synthetic demo: config/demo.yaml (config/config.yaml is the template for your slides)
demo: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml
	@echo
	@echo "Done. Report: results/report/index.html   (all outputs under results/)"

# The her2st benchmark (docs/benchmarks.md): HER2ST=folder with images/, counts/, spots/.
HER2ST ?= ../shared/data/her2st
HER2ST_RUN = $(BIN)/snakemake --config data_root=$(HER2ST)

her2st: install
	$(HER2ST_RUN) --cores $(CORES) --configfile config/her2st.yaml

her2st-effnet: install
	$(HER2ST_RUN) --cores $(CORES) --configfile config/her2st.yaml config/her2st_effnet.yaml

her2st-gpu: install
	$(HER2ST_RUN) --cores all --configfile config/her2st.yaml config/her2st_gpu.yaml

test: install
	$(BIN)/python -m pytest -q

# The tiny end-to-end run of .test/config/config.yaml (about 2.5 minutes on 2 cores): every
# rule runs once on 4 small demo slides (and every SpatialData export); outputs under
# .test/results (gitignored).
TEST_CONFIG := .test/config/config.yaml
test-workflow: install
	# targets before --configfile, which takes every word after it as a config file
	$(BIN)/snakemake all export_all --cores $(CORES) \
		--configfile $(TEST_CONFIG)
	$(BIN)/python .ci/check_demo.py $(TEST_CONFIG) --min-stevs-r -1

# Reruns after a config change (folds.panel, training.seed) retrain and equal a fresh run:
# tests/test_workflow_rerun.py, five small Snakemake runs (about 5 minutes on 2 cores).
test-workflow-rerun: install
	$(BIN)/python -m pytest -q -m workflow_rerun tests/test_workflow_rerun.py

# The .test workflow on a real, single-node Slurm cluster started on this machine (root:
# installs slurm-wlm, slurmdbd, munge, mariadb-server with apt-get when missing): every job a
# Slurm job (sacct), a cancelled job retried, one fold rerun alone (tests/test_slurm.py).
test-slurm: install
	.ci/slurm_cluster.sh install
	$(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

# The workflow plans where only Snakemake is installed (not stevs, torch, ...): a throwaway
# venv with snakemake, its SLURM plugin and pandas (pinned by envs/versions.txt) dry-runs
# the .test config with --sdm conda, as a user of conda would. Snakemake's dry run with
# --sdm conda runs `conda info` (to place the environments), so where no conda binary is
# on PATH it plans without --sdm conda and says so. About 3.5 minutes, nearly all of it pip
# downloading (so not in .ci/run; tests/test_workflow_bare.py checks the same in the suite).
test-plan-bare:
	@set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(PYTHON) -m venv "$$dir/venv"; \
	"$$dir/venv/bin/python" -m pip install --quiet -c envs/versions.txt \
		snakemake snakemake-executor-plugin-slurm pandas; \
	if command -v conda >/dev/null; then sdm="--sdm conda"; else sdm=""; \
		echo "test-plan-bare: no conda on PATH: dry run without --sdm conda"; fi; \
	"$$dir/venv/bin/snakemake" -n $$sdm --cores 2 --configfile $(TEST_CONFIG) > "$$dir/plan.txt" 2>&1 \
		|| { cat "$$dir/plan.txt"; exit 1; }; \
	sed -n '/^Job stats/,/^total/p' "$$dir/plan.txt"; \
	echo "test-plan-bare: planned with only snakemake, its SLURM plugin and pandas" \
		"($${sdm:-without --sdm conda: no conda})"

lint: install
	$(BIN)/ruff check stevs tests benchmarks envs
	$(BIN)/python envs/generate.py --check
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint --configfile config/demo.yaml
	$(BIN)/snakemake --lint --configfile $(TEST_CONFIG)

clean:
	rm -rf results resources/demo .test/results .test/resources .snakemake
