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
    priority: INPUT_PRIORITY
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


rule run_fold:
    # a method's runs on one fold in one process, `stevs run`: for each training seed (the
    # seeded methods every seed of the config: run_outputs), train, then predict the fold's
    # test slides, then score them (docs/benchmarks.md, "Job cost")
    input:
        # the fold file and its slides (train and validation to train on, test to predict and
        # score; torch runs' latent analysis reads the test slides' images too), their patch
        # caches and, for a run on a frozen encoder, their embedding caches
        unpack(fold_inputs("all")),
    output:
        **run_outputs(SEEDS),
    log:
        f"{RESULTS}/logs/run_fold/{{encoder}}/{{method}}/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/run_fold/{{encoder}}/{{method}}/{{fold}}.tsv"
    wildcard_constraints:
        method=methods_pattern(seeded=True),
    priority: run_priority
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=job_mem_mb("run_fold"),
        runtime=job_runtime("run_fold"),
        gpu=gpus,
    params:
        seeds=lambda wildcards: " ".join(map(str, run_seeds(wildcards.method))),
        # the outputs' paths with {seed} for stevs run to fill in
        out=lambda wildcards: f"{RESULTS}/models/{run_folder(wildcards)}/{wildcards.fold}",
        predictions=lambda wildcards: (
            f"{RESULTS}/predictions/{run_folder(wildcards)}/{wildcards.fold}"
        ),
        metrics=lambda wildcards: (
            f"{RESULTS}/metrics/{run_folder(wildcards)}/{wildcards.fold}.tsv"
        ),
        args=training_args,
        protocol=config["evaluation"]["protocol"],
    shell:
        "stevs run --fold {input.fold} --method {wildcards.method} {params.args}"
        " --threads {threads} --seeds {params.seeds} --out {params.out:q}"
        " --predictions {params.predictions:q} --metrics {params.metrics:q}"
        " --protocol {params.protocol} > {log} 2>&1"


# the methods that train no seed (the ridge probes): one run, seed 0
use rule run_fold as run_fold_unseeded with:
    output:
        **run_outputs([0]),
    wildcard_constraints:
        method=methods_pattern(seeded=False),
