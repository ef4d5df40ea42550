"""Checkpoint merging: configuration, planning and streaming execution."""

from moefuse.merge.config import MergeConfig, parse_config
from moefuse.merge.run import merge_checkpoints

__all__ = ["MergeConfig", "merge_checkpoints", "parse_config"]
