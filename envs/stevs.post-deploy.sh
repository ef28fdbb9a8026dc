#!/usr/bin/env bash
# Snakemake runs this inside the new conda environment of envs/stevs.yaml, once, right after
# creating it (`--sdm conda`). It installs the checkout's stevs package, editable (code
# changes need no new environment) and without dependencies (the environment has them).
# Snakemake copies this file to .snakemake/conda/<hash>.post-deploy.sh and runs it from the
# working directory, so the checkout cannot be found from here: workflow/rules/common.smk
# exports it as STEVS_SOURCE while Snakemake parses the rules.
set -euo pipefail
: "${STEVS_SOURCE:?STEVS_SOURCE is not set: run this through the workflow (snakemake --sdm conda)}"
if [ ! -f "$STEVS_SOURCE/pyproject.toml" ]; then
    echo "STEVS_SOURCE=$STEVS_SOURCE holds no pyproject.toml (not a stevs checkout)" >&2
    exit 1
fi
python -m pip install --no-deps --editable "$STEVS_SOURCE"
