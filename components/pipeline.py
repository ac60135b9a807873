"""The ``m3i-pretrain`` pipeline: plan -> shard -> champion -> train -> export -> evaluate -> gate -> promote.

Compiled by ``m3i pipeline compile`` (m3i/pipeline/build.py) into the versioned IR YAML
``m3i/pipeline/m3i-pretrain.yaml``. Kubernetes settings (kfp-kubernetes) land in that
YAML's platform spec: the S3 Secret as env (names only), the cluster's ``m3i-launch``
ConfigMap as an optional config file, and on the in-pod train step the GPU node pool's
node selector and tolerations, GPUs, a memory-backed /dev/shm, a timeout and retries.

After evaluate, the gate decides whether the new version replaces its model's champion; a
``dsl.If`` on its decision runs the promote step, which moves the champion pointer, and a
``dsl.Elif`` records a rejection (and fails the run when ``fail_on_reject`` asks). The
champion step before training resolves, at run time, whether training starts from the
champion's export (``start_from_champion``).
"""

from kfp import dsl, kubernetes

from m3i.config.promote import RegistryConfig
from m3i.pipeline import CONFIG_MOUNT, CPU_IMAGE, LAUNCH_CONFIGMAP, PIPELINE_NAME, REGISTRY_SECRET, S3_SECRET
from m3i_components.evaluate import evaluate
from m3i_components.export import export
from m3i_components.gate import gate
from m3i_components.promote import champion, promote
from m3i_components.shard import plan, shard
from m3i_components.train import train

S3_ENV = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
"""Secret key -> env var of every step (the values never appear in the pipeline)."""

TRAIN_TIMEOUT_S = 7 * 24 * 3600
"""activeDeadlineSeconds of the in-pod train step's pod (a week); a job's own limit is its backoff."""

STEP_TIMEOUT_S = 24 * 3600
"""activeDeadlineSeconds of every other step's pod."""

TRAIN_CPU = "32"
"""CPU request = limit of the in-pod train step (a GPU node's share for 8 GPUs; kfp.local cannot take it as a parameter)."""

TRAIN_MEMORY = "256Gi"
"""Memory request = limit of the in-pod train step, /dev/shm included."""

SHM_SIZE = "64Gi"
"""Size limit of the in-pod train step's memory-backed /dev/shm (DataLoader workers, NCCL)."""

GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
"""Default node selector of GPU work: the label NVIDIA's GPU feature discovery puts on GPU nodes."""

REGISTRY_ENV = {"token": RegistryConfig().token_env}
"""Key of the optional Secret REGISTRY_SECRET -> env var of the promote steps (a reference, never the token)."""

GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
"""Default tolerations of GPU work: the taint GPU node pools usually carry."""


def _cluster_settings(task: dsl.PipelineTask, timeout_s: int = STEP_TIMEOUT_S, component: str = "pipeline") -> dsl.PipelineTask:
    """What every step gets: S3 credentials from the Secret, the cluster config file, a timeout, m3i's pod labels.

    The labels are what the NetworkPolicies of manifests/ and helm/ select (``component:
    pipeline`` may reach the API server; ``train`` pods reach each other).
    """
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "m3i")
    kubernetes.add_pod_label(task, "app.kubernetes.io/component", component)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_ENV)
    kubernetes.use_config_map_as_volume(task, config_map_name=LAUNCH_CONFIGMAP, mount_path=CONFIG_MOUNT, optional=True)
    task.set_env_variable("M3I_CONFIG", f"{CONFIG_MOUNT}/m3i.yaml")
    kubernetes.set_timeout(task, timeout_s)
    return task


def _small_step(task: dsl.PipelineTask, display_name: str) -> dsl.PipelineTask:
    """A promotion step: never cached (it reads and writes the mutable champion pointer), small, cluster settings."""
    task.set_display_name(display_name)
    task.set_caching_options(False)
    task.set_cpu_request("500m").set_memory_request("1Gi").set_cpu_limit("1").set_memory_limit("2Gi")
    return _cluster_settings(task)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="M3I all-in-one pre-training: raw images -> shards -> train -> export -> evaluate -> gate -> promote.",
)
def m3i_pretrain(
    labelled: list = [],
    captions: list = [],
    unlabelled: list = [],
    eval_labelled: list = [],
    webdataset: list = [],
    eval_fraction: float = 0.0,
    storage_uri: str = "s3://m3i",
    run_name: str = "",
    preset: str = "default",
    overrides: list = [],
    backbone: str = "",
    steps: int = 0,
    launcher: str = "inline",
    nodes: int = 1,
    gpus_per_node: int = 8,
    zero_stage: int = 1,
    precision: str = "bf16",
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
    model_name: str = "m3i",
    knn_k: int = 20,
    probe_epochs: int = 100,
    finetune_steps: int = 0,
    start_from_champion: bool = False,
    fail_on_reject: bool = False,
):
    """M3I pre-training of a ViT backbone from raw images in object storage.

    Outputs go under ``storage_uri``: ``datasets/``, ``runs/<run>``,
    ``models/<name>/<version>``, ``evals/<run>``; the champion of each model is
    ``models/<name>/champion.json``, its promotion log ``models/<name>/promotions/``.

    Args:
        labelled: Folders of class sub-folders (``<class>/<image>``), local or ``s3://``.
        captions: JSONL/CSV files of image,caption; their images are read relative to them.
        unlabelled: Folders of images without labels.
        eval_labelled: Folders of class sub-folders kept whole as the held-out split.
        webdataset: Existing WebDataset tars (brace patterns like ``s3://b/laion/{00000..00099}.tar``), read where they are.
        eval_fraction: Fraction of each labelled class moved to the held-out split.
        storage_uri: Root of all outputs, ``s3://bucket[/prefix]``.
        run_name: Names runs/<run> and evals/<run>; empty uses the KFP run id. Reusing a name resumes its training.
        preset: m3i config preset (default, demo).
        overrides: ``section.key=value`` config overrides for every step.
        backbone: Backbone name; empty keeps the preset's.
        steps: Optimizer steps; 0 keeps the preset's.
        launcher: inline (torchrun in the train step's pod, one node), or a multi-node job: volcano, pytorchjob or trainjob (Kubeflow Trainer v2).
        nodes: Nodes of a volcano/pytorchjob/trainjob job (inline needs 1).
        gpus_per_node: GPUs (= training processes) per node; 0 trains on CPU with the preset's process count.
        zero_stage: DeepSpeed ZeRO stage 0-3; -1 keeps the preset's.
        precision: fp32, bf16 or fp16; empty keeps the preset's.
        gpu_node_selector: Node selector of the GPU work (the inline train step or the job's pods).
        gpu_tolerations: Tolerations of the GPU work (Kubernetes toleration objects).
        model_name: Name of the exported model.
        knn_k: kNN neighbours in evaluation; 0 keeps the preset's.
        probe_epochs: Linear-probe epochs; 0 keeps the preset's.
        finetune_steps: Fine-tune steps in evaluation; 0 skips it, -1 keeps the preset's.
        start_from_champion: Start training from the current champion of model_name (continued
            pre-training, resolved when the run runs); random initialisation while it has none.
        fail_on_reject: Fail the run when the gate rejects the new version (it is recorded and kept either way).
    """
    plan_task = plan(
        labelled=labelled,
        captions=captions,
        unlabelled=unlabelled,
        eval_labelled=eval_labelled,
        webdataset=webdataset,
        eval_fraction=eval_fraction,
        storage_uri=storage_uri,
        preset=preset,
        overrides=overrides,
    )
    plan_task.set_display_name("plan: list inputs")
    plan_task.set_caching_options(False)  # reads mutable storage: the listing and the data set's state
    plan_task.set_cpu_request("1").set_memory_request("2Gi").set_cpu_limit("2").set_memory_limit("4Gi")
    _cluster_settings(plan_task)

    shard_task = shard(
        labelled=labelled,
        captions=captions,
        unlabelled=unlabelled,
        eval_labelled=eval_labelled,
        webdataset=webdataset,
        eval_fraction=eval_fraction,
        dataset_uri=plan_task.outputs["dataset_uri"],
        cache_key=plan_task.outputs["cache_key"],
        preset=preset,
        overrides=overrides,
    )
    shard_task.set_display_name("shard: images -> WebDataset shards")
    shard_task.set_caching_options(True)  # output fully determined by cache_key (listing digest) and settings
    shard_task.set_cpu_request("4").set_memory_request("8Gi").set_cpu_limit("8").set_memory_limit("16Gi")
    shard_task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    _cluster_settings(shard_task)

    start_task = champion(
        storage_uri=storage_uri, model_name=model_name, start_from_champion=start_from_champion, preset=preset, overrides=overrides,
    )
    _small_step(start_task, "champion: where training starts")

    train_args = dict(
        dataset=shard_task.outputs["dataset"],
        storage_uri=storage_uri,
        run_name=run_name,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        zero_stage=zero_stage,
        precision=precision,
        backbone=backbone,
        steps=steps,
        node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
        preset=preset,
        overrides=start_task.outputs["Output"],  # the pipeline's, plus train.init_from when it starts from the champion
    )
    with dsl.If(launcher == "inline", name="train-in-step-pod"):
        inline = train(launcher="inline", **train_args)
        inline.set_display_name("train: M3I pre-training (in this pod)")
        inline.set_caching_options(False)  # resumes from, and writes, mutable checkpoints
        inline.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_node)
        inline.set_cpu_request(TRAIN_CPU).set_cpu_limit(TRAIN_CPU)
        inline.set_memory_request(TRAIN_MEMORY).set_memory_limit(TRAIN_MEMORY)
        inline.set_retry(num_retries=3, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="7200s")
        kubernetes.add_node_selector_json(inline, gpu_node_selector)
        kubernetes.add_toleration_json(inline, gpu_tolerations)
        kubernetes.empty_dir_mount(inline, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
        _cluster_settings(inline, TRAIN_TIMEOUT_S, component="train")
        # Its ranks serve metrics on 9400+ without named container ports (KFP declares none):
        # the PodMonitor m3i-train-inline of manifests/ and helm/ scrapes it by relabelled pod IP:port.
        kubernetes.add_pod_label(inline, "m3i.io/launcher", "inline")
    with dsl.Else(name="train-as-job"):
        job = train(launcher=launcher, **train_args)
        job.set_display_name("train: M3I pre-training (distributed job)")
        job.set_container_image(CPU_IMAGE)  # only submits and follows the job: no CUDA needed here
        job.set_caching_options(False)
        job.set_cpu_request("500m").set_memory_request("1Gi").set_cpu_limit("1").set_memory_limit("2Gi")
        job.set_retry(num_retries=3, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="7200s")
        _cluster_settings(job, TRAIN_TIMEOUT_S)
    checkpoint = dsl.OneOf(inline.outputs["Output"], job.outputs["Output"])

    export_task = export(checkpoint_uri=checkpoint, storage_uri=storage_uri, model_name=model_name, preset=preset, overrides=overrides)
    export_task.set_display_name("export: checkpoint -> timm weights + model card")
    export_task.set_caching_options(False)  # reads a checkpoint that retention may delete
    export_task.set_cpu_request("2").set_memory_request("8Gi").set_cpu_limit("4").set_memory_limit("32Gi")
    export_task.set_retry(num_retries=2, backoff_duration="60s")
    _cluster_settings(export_task)

    eval_task = evaluate(
        model=export_task.outputs["model"],
        dataset=shard_task.outputs["dataset"],
        storage_uri=storage_uri,
        run_name=run_name,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        knn_k=knn_k,
        probe_epochs=probe_epochs,
        finetune_steps=finetune_steps,
        preset=preset,
        overrides=overrides,
    )
    eval_task.set_display_name("evaluate: kNN + linear probe")
    eval_task.set_caching_options(False)
    eval_task.set_cpu_request("4").set_memory_request("8Gi").set_cpu_limit("8").set_memory_limit("32Gi")
    eval_task.set_retry(num_retries=2, backoff_duration="60s")
    _cluster_settings(eval_task)

    gate_task = gate(
        model=export_task.outputs["model"],
        results=eval_task.outputs["results"],
        storage_uri=storage_uri,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        preset=preset,
        overrides=overrides,
    )
    gate_task.set_display_name("gate: candidate vs champion")
    gate_task.set_caching_options(False)  # the champion it is held against changes between runs
    gate_task.set_cpu_request("2").set_memory_request("4Gi").set_cpu_limit("4").set_memory_limit("16Gi")  # may re-evaluate the champion
    gate_task.set_retry(num_retries=2, backoff_duration="60s")
    _cluster_settings(gate_task)

    record = dict(
        model=export_task.outputs["model"],
        results=eval_task.outputs["results"],
        storage_uri=storage_uri,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        fail_on_reject=fail_on_reject,
        preset=preset,
        overrides=overrides,
    )
    decision = gate_task.outputs["Output"]
    with dsl.If(decision == "promote", name="promoted"):
        promoted = _small_step(promote(expected="promote", **record), "promote: move the champion pointer")
    with dsl.Elif(decision == "reject", name="rejected"):
        rejected = _small_step(promote(expected="reject", **record), "promote: record the rejection")
    for task in (promoted, rejected):
        # A lost race (another run promoted first) fails the step; its retry decides again against the new champion.
        task.set_retry(num_retries=3, backoff_duration="30s")
        kubernetes.use_secret_as_env(task, secret_name=REGISTRY_SECRET, secret_key_to_env=REGISTRY_ENV, optional=True)
