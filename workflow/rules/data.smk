rule make_demo:
    output:
        sheet=DEMO_SHEET,
    log:
        f"{RESULTS}/logs/make_demo.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_demo.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("make_demo"),
        runtime=job_runtime("make_demo"),
    params:
        out=lambda wildcards, output: str(Path(output.sheet).parent),
        seed=config["demo"]["seed"],
        n_slides=config["demo"]["n_slides"],
        size_um=config["demo"]["size_um"],
        mpp=config["demo"]["mpp"],
    shell:
        "stevs demo --out {params.out} --seed {params.seed} --n-slides {params.n_slides}"
        " --size-um {params.size_um} --mpp {params.mpp} > {log} 2>&1"


rule ingest_slide:
    input:
        unpack(ingest_inputs),
    output:
        f"{RESULTS}/slides/{{slide}}.h5ad",
    log:
        f"{RESULTS}/logs/ingest_slide/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest_slide/{{slide}}.tsv"
    priority: INPUT_PRIORITY
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("ingest_slide"),
        runtime=job_runtime("ingest_slide"),
    params:
        sheet=DEMO_SHEET if DEMO else config["samples"],
        row=ingest_row,
        data_root=f"--data-root {config['data_root']}" if config["data_root"] else "",
    shell:
        "stevs ingest --sample-sheet {params.sheet} --slide-id {wildcards.slide}"
        " {params.data_root} --out {output} > {log} 2>&1"


rule tile_slide:
    input:
        f"{RESULTS}/slides/{{slide}}.h5ad",
    output:
        cache=f"{RESULTS}/patches/{{slide}}.h5",
        qc=report(
            f"{RESULTS}/patches/{{slide}}.qc.png",
            caption="../report/tiling_qc.rst",
            category="Tiling QC",
            labels={"slide": "{slide}"},
        ),
    log:
        f"{RESULTS}/logs/tile_slide/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile_slide/{{slide}}.tsv"
    priority: INPUT_PRIORITY
    conda:
        "../../envs/stevs.yaml"
    threads: config["tiling"]["threads"]
    resources:
        mem_mb=job_mem_mb("tile_slide"),
        runtime=job_runtime("tile_slide"),
    params:
        patch_px=config["tiling"]["patch_px"],
        patch_um=config["tiling"]["patch_um"],
    shell:
        "stevs tile --slide {input} --out {output.cache} --qc {output.qc}"
        " --patch-px {params.patch_px} --patch-um {params.patch_um} --threads {threads}"
        " > {log} 2>&1"


# an encoder's own patch geometry (encoders[].patch_px / patch_um, common.smk): tiled once
# per slide and geometry, for every encoder that reads it; its QC beside the cache, not in
# the report (the report's tiling QC is the tiling: section's)
use rule tile_slide as tile_slide_geometry with:
    output:
        cache=f"{RESULTS}/patches/{{geometry}}/{{slide}}.h5",
        qc=f"{RESULTS}/patches/{{geometry}}/{{slide}}.qc.png",
    log:
        f"{RESULTS}/logs/tile_slide/{{geometry}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile_slide/{{geometry}}/{{slide}}.tsv"
    params:
        patch_px=lambda wildcards: OTHER_GEOMETRIES[wildcards.geometry][0],
        patch_um=lambda wildcards: format_um(OTHER_GEOMETRIES[wildcards.geometry][1]),


rule make_folds:
    input:
        slides=expand(f"{RESULTS}/slides/{{slide}}.h5ad", slide=SLIDES),
        gene_list=config["folds"]["gene_list"] or [],
        # scheme fixed: the split table (or HEST splits/ folder) the folds come from
        splits=SPLITS_PATH if SCHEME == "fixed" else [],
    output:
        folds=expand(f"{RESULTS}/folds/{{fold}}.json", fold=FOLDS),
        summary=f"{RESULTS}/folds/folds.tsv",
    log:
        f"{RESULTS}/logs/make_folds.log",
    benchmark:
        f"{RESULTS}/benchmarks/make_folds.tsv"
    priority: INPUT_PRIORITY
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("make_folds"),
        runtime=job_runtime("make_folds"),
    params:
        args=folds_args(),
        results=lambda wildcards, output: str(Path(output.summary).parent.parent),
    shell:
        "mkdir -p {params.results}/patches && stevs folds --slides {input.slides}"
        " --patches-dir {params.results}/patches {params.args}"
        " --out-dir {params.results}/folds > {log} 2>&1"
