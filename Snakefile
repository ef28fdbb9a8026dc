"""stevs: spatial gene expression from H&E whole-slide images, proven on held-out sections.

The DAG: ingest_slide -> tile_slide -> make_folds -> train -> predict -> evaluate -> report.
Every rule calls a `stevs` command; all logic lives in the `stevs` package.
"""

from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/predict_slide.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/report/index.html",
        PREDICTED_SLIDES,
