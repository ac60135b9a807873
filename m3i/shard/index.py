"""Moved: the shard index's names and reader live in :mod:`m3i.artifacts.dataset` (issue #21).

Kept only while the shard modules being split out of ``m3i/shard/__init__.py`` still import
them from here; import from :mod:`m3i.artifacts` instead. Goes once nothing imports it.
"""

from m3i.artifacts.dataset import FORMAT, FORMAT_VERSION, INDEX_KEY, ShardIndex, ShardInfo, read_index

__all__ = ["FORMAT", "FORMAT_VERSION", "INDEX_KEY", "ShardInfo", "ShardIndex", "read_index"]
