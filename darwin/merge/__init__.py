"""The merge: plan every tensor from the genome (`plan`), then stream the merge tensor by tensor (`engine`) into a
checkpoint on disk (`to_disk`) or into a model in memory (`into_model`); the methods in one registry (`methods`).

The engine maps the parents' shards (no copy on read), computes both parents' MRI statistics of the tensors it
merges (all threads), then merges tensor by tensor into recycled output memory while a thread writes the previous
tensor. The same genome gives the same bytes on any device, worker or order.
"""

from darwin.merge.engine import merged_tensors
from darwin.merge.into_model import merge_into_model
from darwin.merge.methods import METHODS, Method
from darwin.merge.plan import MergePlan, plan_merge
from darwin.merge.to_disk import REPORT_NAME, existing_merge, merge_to_dir

__all__ = [
    "METHODS",
    "REPORT_NAME",
    "MergePlan",
    "Method",
    "existing_merge",
    "merge_into_model",
    "merge_to_dir",
    "merged_tensors",
    "plan_merge",
]
