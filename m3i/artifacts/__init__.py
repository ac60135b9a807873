"""The read layer: the one place that knows the file names and layouts of what the stages leave behind.

    index = read_index(open_store("s3://m3i/datasets/1a2b"))     # a data set (m3i shard)
    summary = read_summary("s3://m3i/runs/r1")                     # a run (m3i train): summary.json
    rows = read_history("s3://m3i/runs/r1")                        #   and history.jsonl
    src = locate_checkpoint("s3://m3i/runs/r1")                    # a checkpoint, its files checked on use
    config = read_exported_config("s3://m3i/models/m/v00000500-1a2b3c4d")   # an export (m3i export)
    ev = read_evaluation("s3://m3i/evals/r1")                      # an evaluation (m3i evaluate): metrics.json

==============  =========================================  ==========================================
artifact        layout                                     module
==============  =========================================  ==========================================
data set        ``index.json`` + ``<split>/*.tar``          :mod:`m3i.artifacts.dataset`
run             ``summary.json``, ``history.jsonl``         :mod:`m3i.artifacts.run`
checkpoint      ``checkpoints/step-XXXXXXXX/`` +            :mod:`m3i.artifacts.checkpoint`;
                ``complete.json`` written last              DeepSpeed's files: :mod:`m3i.artifacts.zero`
export          ``model.safetensors``, ``config.json``,     :mod:`m3i.artifacts.export`
                ``SHA256SUMS``, ``export.json`` last
evaluation      ``metrics.json`` written last               :mod:`m3i.artifacts.evaluation`
==============  =========================================  ==========================================

Every stage reads what an earlier one wrote through here, so no stage imports a later one to find
a file; writers stay in their stages and take the names from here. An artifact that is unsafe (a
planted pickle) or damaged (truncated, altered, parts missing) is refused with one error family
(:mod:`m3i.artifacts.errors`) wherever it is read.

This face imports neither torch nor safetensors (the command line and ``m3i shard`` read
through it); :mod:`m3i.artifacts.zero`, which reads tensors out of DeepSpeed checkpoints, is
imported on its own.
"""

from m3i.artifacts.checkpoint import (
    MARKER,
    PREFIX,
    CheckpointRef,
    CheckpointSource,
    find_latest,
    list_complete,
    locate_checkpoint,
    run_output_of,
)
from m3i.artifacts.dataset import INDEX_KEY, ShardIndex, ShardInfo, check_shards, content_sha256, read_index
from m3i.artifacts.errors import ArtifactError, DamagedArtifactError, DamagedFileError, UnsafeCheckpointError
from m3i.artifacts.evaluation import METRICS_FILE, EvalSet, Evaluation, evaluation_from_metrics, read_evaluation
from m3i.artifacts.export import (
    CONFIG,
    MANIFEST,
    PREFIXES,
    WEIGHTS,
    is_export,
    read_export_manifest,
    read_exported_config,
    read_exported_weights,
)
from m3i.artifacts.run import HISTORY_FILE, SUMMARY_FILE, TrainSummary, parse_history, read_history, read_summary

__all__ = [
    "ArtifactError",
    "CONFIG",
    "CheckpointRef",
    "CheckpointSource",
    "DamagedArtifactError",
    "DamagedFileError",
    "EvalSet",
    "Evaluation",
    "HISTORY_FILE",
    "INDEX_KEY",
    "MANIFEST",
    "MARKER",
    "METRICS_FILE",
    "PREFIX",
    "PREFIXES",
    "SUMMARY_FILE",
    "ShardIndex",
    "ShardInfo",
    "TrainSummary",
    "UnsafeCheckpointError",
    "WEIGHTS",
    "check_shards",
    "content_sha256",
    "evaluation_from_metrics",
    "find_latest",
    "is_export",
    "list_complete",
    "locate_checkpoint",
    "parse_history",
    "read_evaluation",
    "read_export_manifest",
    "read_exported_config",
    "read_exported_weights",
    "read_history",
    "read_index",
    "read_summary",
    "run_output_of",
]
