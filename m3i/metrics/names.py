"""The one table of Prometheus names m3i exports: training's series, its pushed summary, and promotion's.

Names follow Prometheus conventions: ``m3i_`` prefix, base units, unit suffixes. Counters are
listed by the name PromQL sees (``m3i_train_steps_total``); histograms by their family name
(query ``m3i_train_step_seconds_bucket``, ``_sum`` and ``_count``). prometheus_client adds a
``_created`` series to each counter and histogram; those are its own and not listed.
"""

from __future__ import annotations

__all__ = [
    "BASE_LABELS",
    "BRANCHES",
    "DATA_COUNTERS",
    "METRIC_NAMES",
    "PROMOTE_METRIC_NAMES",
    "PROMOTE_SPECS",
    "SUMMARY_METRIC",
    "TRAIN_SPECS",
]

BRANCHES = ("img", "cls", "txt")
"""The loss branches whose samples ``m3i_train_branch_samples_total`` counts (label ``branch``)."""

BASE_LABELS = ("rank", "run_id")
"""Labels of every training series: sum or average over ``rank`` in PromQL for the run as a whole."""

# Step time spans ~10 ms (tiny CPU runs) to minutes (huge models, slow storage).
_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CHECKPOINT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

DATA_COUNTERS = {
    "shards_failed": "m3i_train_data_shards_failed_total",
    "samples_failed": "m3i_train_data_samples_failed_total",
    "samples_padded": "m3i_train_data_samples_padded_total",
}
"""Keys of the loader's cumulative ``stats()`` -> the counter each one feeds."""

TRAIN_SPECS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "m3i_train_info": ("gauge", "Constant 1; labels describe the run (version, world_size, model).",
                       ("version", "world_size", "model"), None),
    "m3i_train_loss": ("gauge", "Last recorded loss, by part (loss is the weighted total).", ("part",), None),
    "m3i_train_lr": ("gauge", "Learning rate of the last recorded step.", (), None),
    "m3i_train_ema_momentum": ("gauge", "EMA momentum of the target encoder at the last recorded step.", (), None),
    "m3i_train_temperature": ("gauge", "Softmax temperature of the image-text loss at the last recorded step.",
                              (), None),
    "m3i_train_target_std": ("gauge", "Std of the EMA target features over the batch (near 0 means collapse).",
                             (), None),
    "m3i_train_samples_total": ("counter", "Samples this rank trained on.", (), None),
    "m3i_train_steps_total": ("counter", "Finished training steps, skipped ones included.", (), None),
    "m3i_train_skipped_steps_total": ("counter", "Steps whose update was skipped for a NaN/inf loss.", (), None),
    "m3i_train_overflow_steps_total": ("counter", "Optimizer steps DeepSpeed skipped for overflowing gradients and "
                                       "retried (fp16 loss scaling: routine while the scale settles; inf/NaN "
                                       "gradients in bf16).", (), None),
    "m3i_train_samples_per_second": ("gauge", "Samples per second of this rank since the previous recorded step.",
                                     (), None),
    "m3i_train_model_flops_per_second": ("gauge", "Model FLOPs per second of this rank since the previous recorded "
                                         "step (matmul, convolution and attention FLOPs torch counted on the first "
                                         "micro-batch, forward and backward).", (), None),
    "m3i_train_mfu_ratio": ("gauge", "Model FLOPs utilisation of this rank: m3i_train_model_flops_per_second over the "
                            "device's dense peak for the run's precision (set only for GPUs in m3i.models.flops.PEAK_FLOPS).",
                            (), None),
    "m3i_train_step_seconds": ("histogram", "Wall time of a training step, data wait included.", (),
                               _STEP_BUCKETS),
    "m3i_train_data_wait_seconds": ("histogram", "Time a step waited for its batch.", (), _WAIT_BUCKETS),
    "m3i_train_checkpoint_seconds": ("histogram", "Wall time of a checkpoint save, failed ones included.", (),
                                     _CHECKPOINT_BUCKETS),
    "m3i_train_checkpoint_failures_total": ("counter", "Checkpoint saves that failed.", (), None),
    "m3i_train_branch_samples_total": ("counter", "Samples that fed each branch's loss.", ("branch",), None),
    "m3i_train_data_shards_failed_total": ("counter", "Shards the loader could not read.", (), None),
    "m3i_train_data_samples_failed_total": ("counter", "Samples the loader could not decode.", (), None),
    "m3i_train_data_samples_padded_total": ("counter", "Samples repeated to even out the ranks' batches.", (), None),
    "m3i_train_gpu_memory_bytes": ("gauge", "CUDA memory of this rank's device (set only where CUDA is available).",
                                   ("kind",), None),
    "m3i_train_step": ("gauge", "Last finished step.", (), None),
    "m3i_train_last_step_timestamp_seconds": ("gauge", "Unix time the last step finished (alert on staleness).",
                                              (), None),
}
"""name -> (type, help, labels beyond :data:`BASE_LABELS`, histogram buckets). The one place a training name is spelt."""

SUMMARY_METRIC = "m3i_train_summary"
"""The one gauge :func:`m3i.metrics.push.push_summary` pushes, one series per summary entry (label ``name``)."""

METRIC_NAMES: tuple[str, ...] = (*TRAIN_SPECS, SUMMARY_METRIC)
"""Every metric name m3i training exports (``/metrics`` and the Pushgateway), as PromQL sees it;
histograms by family name (their series end in ``_bucket``, ``_sum``, ``_count``)."""

PROMOTE_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "m3i_promote_decisions_total": ("counter", "Events of the model's promotion log, by action (promote, reject, rollback).",
                                    ("action",)),
    "m3i_promote_consecutive_rejections": ("gauge", "Candidates rejected since the champion was last set.", ()),
    "m3i_promote_champion_info": ("gauge", "Constant 1; labels name the champion (version, previous).", ("version", "previous")),
    "m3i_promote_champion_timestamp_seconds": ("gauge", "Unix time the champion was set (its age: time() minus this).", ()),
}
"""name -> (type, help, labels beyond job/model). What m3i.promote pushes (job m3i-promote), read from the log."""

PROMOTE_METRIC_NAMES: tuple[str, ...] = tuple(PROMOTE_SPECS)
"""Every metric name ``m3i promote`` pushes to the Pushgateway, as PromQL sees it."""
