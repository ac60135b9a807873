"""Thin KFP v2 interfaces over the m3i library, one component per stage (importable as ``m3i_components``).

Each component is a lightweight ``@dsl.component`` on an m3i image: its body only moves
KFP inputs into a call of :mod:`m3i.pipeline.steps` and the result into KFP outputs, so
the same pipeline runs on a cluster and on this machine with ``kfp.local``.
"""

from m3i_components.evaluate import evaluate
from m3i_components.export import export
from m3i_components.gate import gate
from m3i_components.pipeline import m3i_pretrain
from m3i_components.promote import champion, promote
from m3i_components.shard import plan, shard
from m3i_components.train import train

__all__ = ["plan", "shard", "champion", "train", "export", "evaluate", "gate", "promote", "m3i_pretrain"]
