# SpatialData zarr stores of predictions, slides and H&E-only predictions (`stevs export`,
# the interop extra). Not part of `all`: ask for one store, or `export_all` (Snakefile).


rule export_prediction:
    input:
        f"{RESULTS}/predictions/{RUN}/{{fold}}/predictions.tsv",
    output:
        directory(f"{RESULTS}/export/{RUN}/{{fold}}/{{slide}}.zarr"),
    log:
        f"{RESULTS}/logs/export/{RUN}/{{fold}}/{{slide}}.log",
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("export"),
        runtime=job_runtime("export"),
    params:
        folder=lambda wildcards, input: str(Path(input[0]).parent),
    shell:
        "stevs export --input {params.folder}/{wildcards.slide}.h5ad --out {output} > {log} 2>&1"


rule export_slide:
    input:
        f"{RESULTS}/slides/{{slide}}.h5ad",
    output:
        directory(f"{RESULTS}/export/slides/{{slide}}.zarr"),
    log:
        f"{RESULTS}/logs/export/slides/{{slide}}.log",
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("export"),
        runtime=job_runtime("export"),
    shell:
        "stevs export --input {input} --out {output} > {log} 2>&1"


rule export_predict_slide:
    input:
        f"{RESULTS}/predict_slides/{{pslide}}/{{pslide}}.h5ad",
    output:
        directory(f"{RESULTS}/export/predict_slides/{{pslide}}.zarr"),
    log:
        f"{RESULTS}/logs/export/predict_slides/{{pslide}}.log",
    wildcard_constraints:
        pslide=SLIDE_ID_PATTERN.pattern,
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("export"),
        runtime=job_runtime("export"),
    shell:
        "stevs export --input {input} --out {output} > {log} 2>&1"
