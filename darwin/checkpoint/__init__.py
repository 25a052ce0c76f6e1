"""Checkpoint I/O: where a model lives, lazy reads by tensor name, and an atomic, streaming sharded writer.

A model is a local directory, a Hugging Face hub id (`org/name`, or `org/name@revision`), or any fsspec URL
(s3://...); a PEFT LoRA adapter on its base (`BASE+ADAPTER`, or an adapter naming its base) reads as the merged model
(darwin.lora). Weights are safetensors (sharded with `model.safetensors.index.json`, or one `model.safetensors`);
pickle checkpoints are refused unless asked for. Nothing here holds a whole model in memory: readers return one
tensor at a time, and the writer streams each tensor into its shard file behind a header written first (the plan
knows every shape in advance).
"""

from darwin.checkpoint.compatibility import check_compatible, language_model_config
from darwin.checkpoint.dtypes import (
    DTYPES,
    FLOAT_DTYPES,
    TensorInfo,
    dtype_name,
    raw_dtype,
    st_dtype,
    to_raw,
    to_torch,
    torch_dtype,
)
from darwin.checkpoint.location import INDEX_NAME, SINGLE_NAME, resolve, split_adapter
from darwin.checkpoint.reader import Checkpoint, content_sha256
from darwin.checkpoint.writer import CheckpointWriter, ShardStream, copy_side_files

__all__ = [
    "DTYPES", "FLOAT_DTYPES", "INDEX_NAME", "SINGLE_NAME", "Checkpoint", "CheckpointWriter", "ShardStream",
    "TensorInfo", "check_compatible", "content_sha256", "copy_side_files", "dtype_name", "language_model_config",
    "raw_dtype", "resolve", "split_adapter", "st_dtype", "to_raw", "to_torch", "torch_dtype",
]
