rule train:
    input:
        # the fold file and only the slides the fold trains and validates on
        unpack(fold_inputs("fit")),
    output:
        model=f"{RESULTS}/models/{{method}}/{{fold}}/model.safetensors",
    log:
        f"{RESULTS}/logs/train/{{method}}/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{method}}/{{fold}}.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=config["resources"]["train_runtime"],
        gpu=config["resources"]["gpu"],
    params:
        out=lambda wildcards, output: str(Path(output.model).parent),
        args=lambda wildcards: training_args(wildcards.method),
    shell:
        "stevs train --fold {input.fold} --method {wildcards.method} {params.args}"
        " --threads {threads} --out {params.out} > {log} 2>&1"


rule predict:
    input:
        # the fold file and only its test slides
        unpack(fold_inputs("test")),
        model=f"{RESULTS}/models/{{method}}/{{fold}}/model.safetensors",
    output:
        directory(f"{RESULTS}/predictions/{{method}}/{{fold}}"),
    log:
        f"{RESULTS}/logs/predict/{{method}}/{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/{{method}}/{{fold}}.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: config["resources"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=config["resources"]["gpu"],
    params:
        model_dir=lambda wildcards, input: str(Path(input.model).parent),
        device=config["training"]["device"],
    shell:
        "stevs predict --model-dir {params.model_dir} --fold {input.fold}"
        " --device {params.device} --threads {threads} --out-dir {output} > {log} 2>&1"
