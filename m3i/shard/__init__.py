"""``m3i shard``: raw images -> WebDataset tar shards + ``index.json`` in object storage.

Layout under ``shard.out``::

    index.json                            written last: the only thing readers trust
    train/train-00000-00-<sha>.tar ...    shards: <split>-<unit>-<part>-<first 12 hex of sha256>.tar
    eval/eval-00000-00-<sha>.tar ...
    _progress/train-00000.json ...        per-unit records that make re-runs resume
    _progress/tars/<hash>.json            listings of WebDataset tar inputs
    _lock.json                            held by the run writing this output

The modules, in the order a run uses them: :mod:`~m3i.shard.plan` lists the inputs (folder
:mod:`~m3i.shard.sources`, :mod:`~m3i.shard.captions`, :mod:`~m3i.shard.tars`; their shared
types in :mod:`~m3i.shard.inputs`, every read checked by :mod:`~m3i.shard.files`) and cuts them
into units; :mod:`~m3i.shard.writer` encodes (:mod:`~m3i.shard.encode`) and writes each unit,
its record last; :mod:`~m3i.shard.publish` writes the index last and then
:mod:`~m3i.shard.collection` deletes what no index lists; :mod:`~m3i.shard.run` drives it all
under :mod:`~m3i.shard.lock`; :mod:`~m3i.shard.verify` checks a published data set.
"""

from m3i.artifacts.dataset import INDEX_KEY, ShardIndex, ShardInfo, read_index
from m3i.shard.lock import OutputLocked
from m3i.shard.run import ShardError, shard
from m3i.shard.verify import Verification, verify

__all__ = [
    "shard", "verify", "Verification", "ShardError", "ShardIndex", "ShardInfo", "OutputLocked", "read_index", "INDEX_KEY",
]
