"""Data-free merging of task vectors, streamed key by key from a store."""
from .base import KeyInput, Merger, PerTaskDelta
from .engine import MergePlan, iter_merged, merge_state_dict, plan_merge
from .output import write_merged, write_per_task
from .registry import create_merger, get_merger_class, list_mergers, register_merger

__all__ = ["KeyInput", "MergePlan", "Merger", "PerTaskDelta", "create_merger", "get_merger_class", "iter_merged",
           "list_mergers", "merge_state_dict", "plan_merge", "register_merger", "write_merged", "write_per_task"]
