rule embed_slide:
    input:
        f"{RESULTS}/patches/{{slide}}.h5",
    output:
        f"{RESULTS}/embeddings/{{preset}}/{{view}}/{{slide}}.h5",
    log:
        f"{RESULTS}/logs/embed/{{preset}}/{{view}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{preset}}/{{view}}/{{slide}}.tsv"
    wildcard_constraints:
        preset="|".join(
            map(re.escape, sorted({e["preset"] for e in ENCODERS.values()}))
        ),
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=job_mem_mb("embed_slide"),
        runtime=job_runtime("embed_slide"),
        gpu=config["resources"]["gpu"],
    params:
        device=config["training"]["device"],
    shell:
        "stevs embed --patches {input} --preset {wildcards.preset} --view {wildcards.view}"
        " --device {params.device} --threads {threads} --out {output} > {log} 2>&1"


# the embeddings of an encoder with its own patch geometry (common.smk: embedding_dir)
use rule embed_slide as embed_slide_geometry with:
    input:
        f"{RESULTS}/patches/{{geometry}}/{{slide}}.h5",
    output:
        f"{RESULTS}/embeddings/{{preset}}/{{geometry}}/{{view}}/{{slide}}.h5",
    log:
        f"{RESULTS}/logs/embed/{{preset}}/{{geometry}}/{{view}}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed/{{preset}}/{{geometry}}/{{view}}/{{slide}}.tsv"


rule train:
    input:
        # the fold file and the slides the fold trains and validates on (and, for a frozen
        # encoder, those slides' embedding caches); torch runs also the test slides', for the
        # latent analysis of their images (train_inputs)
        unpack(train_inputs),
    output:
        model=f"{RESULTS}/models/{RUN}/{{fold}}/model.safetensors",
    log:
        f"{RESULTS}/logs/train/{RUN}/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{RUN}/{{fold}}.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=job_mem_mb("train"),
        runtime=job_runtime("train"),
        gpu=gpus,
    params:
        out=lambda wildcards, output: str(Path(output.model).parent),
        args=training_args,
    shell:
        "stevs train --fold {input.fold} --method {wildcards.method} {params.args}"
        " --threads {threads} --out {params.out} > {log} 2>&1"


rule predict:
    input:
        # the fold file and only its test slides
        unpack(fold_inputs("test")),
        model=f"{RESULTS}/models/{RUN}/{{fold}}/model.safetensors",
    output:
        # the list of the fold's prediction files, written last beside them (a file, not a
        # directory() output: Snakemake would keep a timestamp file in the user's folder)
        f"{RESULTS}/predictions/{RUN}/{{fold}}/predictions.tsv",
    log:
        f"{RESULTS}/logs/predict/{RUN}/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/{RUN}/{{fold}}.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=job_mem_mb("predict"),
        runtime=job_runtime("predict"),
        gpu=gpus,
    params:
        model_dir=lambda wildcards, input: str(Path(input.model).parent),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        device=config["training"]["device"],
        # the embedding caches and the patch geometry's caches it reads, where not the fold
        # file's (one placeholder: a new one in the command would rerun every finished job,
        # Snakemake's code trigger compares the command's text)
        embeddings=predict_args,
    shell:
        "stevs predict --model-dir {params.model_dir} --fold {input.fold}"
        " {params.embeddings} --device {params.device} --threads {threads}"
        " --out-dir {params.out_dir} > {log} 2>&1"
