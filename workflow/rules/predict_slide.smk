"""Apply a method's trained models (all folds, as an ensemble) to H&E-only slides.

Driven by config["predict_slides"]: `sheet` (slide_id, image, optional mpp), `model` (the
method whose models predict) and `genes` (maps to draw; empty = the headline genes).
"""

from stevs.demo.constants import HEONLY_ID
from stevs.ids import SLIDE_ID_PATTERN
from stevs.io.samples import read_predict_sheet

PREDICT = config["predict_slides"]
DEMO_PREDICT_SHEET = str(Path(config["demo"]["out"]) / "predict.tsv")
# the first run (encoder, seed) of that method predicts, with its models of every fold
# (checked before: stevs.config_checks, an H&E-capable method among the methods, with a run)
PREDICT_RUNS = [r for r in RUNS if r[1] == PREDICT["model"]][:1]
PREDICT_ENCODER = PREDICT_RUNS[0][0] if PREDICT_RUNS else "none"
PREDICT_IS_DEMO = DEMO and str(Path(PREDICT["sheet"])) == str(Path(DEMO_PREDICT_SHEET))

# slide id -> image; the demo's H&E-only slide is known before the demo exists
PREDICT_IMAGES = {}
if PREDICT_IS_DEMO and not Path(PREDICT["sheet"]).is_file():
    PREDICT_IMAGES = {HEONLY_ID: str(Path(config["demo"]["out"]) / f"{HEONLY_ID}.tif")}
elif PREDICT["sheet"]:
    try:
        _predict_table = read_predict_sheet(
            PREDICT["sheet"],
            data_root=config["data_root"] or None,
            check_paths=not PREDICT_IS_DEMO,
        )
    except StevsInputError as err:
        raise WorkflowError(f"predict sheet: {err}") from None
    PREDICT_IMAGES = dict(zip(_predict_table["slide_id"], _predict_table["image"]))
PSLIDES = list(PREDICT_IMAGES)

PREDICTED_SLIDES = expand(
    f"{RESULTS}/predict_slides/{{pslide}}/{{pslide}}.h5ad", pslide=PSLIDES
)


rule predict_slide:
    input:
        # the sheet and the slide's image; the demo rule makes the demo's (sheet written last)
        unpack(
            lambda wildcards: (
                {"sheet": DEMO_SHEET}
                if PREDICT_IS_DEMO
                else {
                    "sheet": PREDICT["sheet"],
                    "image": PREDICT_IMAGES.get(wildcards.pslide, []),
                }
            )
        ),
        models=run_paths(
            f"{RESULTS}/models/{{run}}/{{fold}}/model.safetensors", PREDICT_RUNS
        ),
    output:
        adata=f"{RESULTS}/predict_slides/{{pslide}}/{{pslide}}.h5ad",
        qc=f"{RESULTS}/predict_slides/{{pslide}}/tissue.png",
        maps=report(
            directory(f"{RESULTS}/predict_slides/{{pslide}}/maps"),
            patterns=["{gene}.png"],
            category="Predicted maps",
            subcategory="{pslide}",
            labels={"slide": "{pslide}", "gene": "{gene}"},
        ),
    log:
        f"{RESULTS}/logs/predict_slide/{{pslide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict_slide/{{pslide}}.tsv"
    wildcard_constraints:
        pslide=SLIDE_ID_PATTERN.pattern,
    conda:
        "../../envs/stevs.yaml"
    threads: 2
    resources:
        mem_mb=job_mem_mb("predict_slide"),
        runtime=job_runtime("predict_slide"),
        gpu=config["resources"]["gpu"],
    params:
        sheet=PREDICT["sheet"],
        data_root=f"--data-root {config['data_root']}" if config["data_root"] else "",
        # the model folders, and the patch geometry of their encoder where it is not the
        # tiling's (the models record the scale they were trained on, the same; said here for
        # the command, with the models: a new placeholder would rerun every finished job)
        models=lambda wildcards, input: " ".join(
            [
                *(str(Path(m).parent) for m in input.models),
                geometry_args(PREDICT_ENCODER),
            ]
        ).strip(),
        out_dir=lambda wildcards, output: str(Path(output.adata).parent),
        genes=(
            "--genes " + " ".join(shlex.quote(g) for g in PREDICT["genes"])
            if PREDICT["genes"]
            else ""
        ),
        device=config["training"]["device"],
    shell:
        "stevs predict-slide --sheet {params.sheet} {params.data_root}"
        " --slide-id {wildcards.pslide} --models {params.models}"
        " --out-dir {params.out_dir} {params.genes} --device {params.device}"
        " --threads {threads} > {log} 2>&1"
