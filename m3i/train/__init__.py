"""``m3i train``: single-stage M3I pre-training with DeepSpeed under torch.distributed."""

from m3i.train.checkpoint import Checkpointer, CheckpointRef, find_latest
from m3i.train.loop import Preempted, TrainingDiverged, TrainSummary, train

__all__ = ["Checkpointer", "CheckpointRef", "Preempted", "TrainSummary", "TrainingDiverged", "find_latest", "train"]
