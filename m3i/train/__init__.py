"""``m3i train``: single-stage M3I pre-training with DeepSpeed under torch.distributed."""

from m3i.train.checkpoint import Checkpointer
from m3i.train.loop import Preempted, TrainingDiverged, TrainSummary, train

__all__ = ["Checkpointer", "Preempted", "TrainSummary", "TrainingDiverged", "train"]
