rule write_config:
    output:
        f"{RESULTS}/config.yaml",
    log:
        f"{RESULTS}/logs/write_config.log",
    localrule: True
    conda:
        "../../envs/stevs.yaml"
    params:
        # the merged config is a parameter: an unchanged config leaves the file (and the
        # report) alone, a changed one rewrites it (--rerun-triggers params, the default)
        text=CONFIG_YAML,
    shell:
        "printf '%s' {params.text:q} > {output} 2> {log}"


rule report:
    input:
        # this config's runs only (`--only`): stale metrics of an earlier config in the same
        # folder are not read
        metrics=all_metrics(),
        models=run_paths(f"{RESULTS}/models/{{run}}/{{fold}}/model.safetensors"),
        config=f"{RESULTS}/config.yaml",
    output:
        html=report(
            f"{RESULTS}/report/index.html",
            caption="../report/report.rst",
            category="Report",
        ),
        summary=report(
            f"{RESULTS}/report/summary.tsv",
            caption="../report/summary.rst",
            category="Report",
        ),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../../envs/stevs.yaml"
    threads: 1
    resources:
        mem_mb=job_mem_mb("report"),
        runtime=job_runtime("report"),
    params:
        max_map_slides=config["report"]["max_map_slides"],
        results=lambda wildcards, output: str(Path(output.html).parent.parent),
        # the per-gene tables (their summary and pooled tables lie beside them)
        tables=lambda wildcards, input: [
            p for p in input.metrics if not p.endswith((".summary.tsv", ".pooled.tsv"))
        ],
    shell:
        "stevs report --metrics {params.results}/metrics --only {params.tables:q}"
        " --predictions {params.results}/predictions --folds {params.results}/folds"
        " --models {params.results}/models --config {input.config}"
        " --max-map-slides {params.max_map_slides} --out {params.results}/report > {log} 2>&1"
