"""stevs: spatial gene expression from H&E whole-slide images, proven on held-out sections.

The DAG: (make_demo ->) ingest_slide -> tile_slide -> make_folds (-> embed_slide) -> run_fold
(train, predict, evaluate: one job per encoder x method x seed x fold) -> report, plus write_config ({results}/config.yaml, the merged config the report
shows) and predict_slide (H&E-only slides). Every rule but write_config calls a `stevs`
command; all logic lives in the `stevs` package. workflow/rules/common.smk checks the config
and the sample sheet before any job runs. The tiny end-to-end test: .test/config/config.yaml.
"""

from snakemake.utils import min_version

min_version("8.0")


# Your own slides: config/config.yaml (the template) when no --configfile is given; with
# --configfile, those files alone (on top of the schema's defaults), so that a config of
# your own inherits nothing from another file (the demo is config/demo.yaml: `make demo`).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/predict_slide.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/report/index.html",
        PREDICTED_SLIDES,


rule export_all:
    # every test prediction, slide and H&E-only prediction as SpatialData (export.smk)
    input:
        all_exports(),
