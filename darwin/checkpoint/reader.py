"""Reading a checkpoint: the tensor index from the shard headers, one tensor at a time by name (a view of the
mapped shard), an adapter parent as base + peft's merge, and a content fingerprint."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from darwin import lora
from darwin.checkpoint.dtypes import DTYPES, TensorInfo, raw_dtype, st_dtype, to_raw, to_torch, torch_dtype
from darwin.checkpoint.location import INDEX_NAME, PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME, SINGLE_NAME, split_adapter
from darwin.errors import DarwinError
from darwin.kinds import Family, family_for_config
from darwin.runtime import CACHE_ROOT, load_pretrained

if TYPE_CHECKING:  # torch is imported where a tensor is made: `darwin merge` on CPU runs without it
    import torch


class Checkpoint:
    """A checkpoint's tensor index, read from the shard headers only; tensors are read one at a time by name."""

    def __init__(self, model: str | os.PathLike, allow_pickle: bool = False, trust_remote_code: bool = False):
        self.path, adapter = split_adapter(model, trust_remote_code)
        self.config = self._read_config()
        self.family: Family = family_for_config(self.config)
        self._pickled_states: dict[str, object] = {}
        self._maps: dict[str, tuple[np.ndarray, int, dict[str, list[int]]]] = {}
        self._lock = threading.Lock()
        self._pickled = False
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shard_files(allow_pickle):
            for info in self._read_header(shard):
                self.tensors[info.name] = info
        if not self.tensors:
            raise DarwinError(f"checkpoint has no tensors: {self.path}")
        self.adapter = lora.LoraAdapter(adapter, self) if adapter is not None else None
        for name in self.adapter.replaced if self.adapter else ():  # stored in the base's dtype, at the adapter's shape
            self.tensors[name] = replace(self.tensors[name], shape=self.adapter.shape(name))

    @property
    def source(self) -> str:
        """What opens this checkpoint again (in another task or process): its directory, `BASE+ADAPTER` for an
        adapter parent."""
        return str(self.path) if self.adapter is None else f"{self.path}+{self.adapter.path}"

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.tensors)} tensors, {len(self.shards)} shards)"

    def _read_config(self) -> dict:
        path = self.path / "config.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DarwinError(f"corrupt config.json in {self.path}: {exc}") from None

    def _shard_files(self, allow_pickle: bool) -> list[str]:
        if (self.path / INDEX_NAME).exists():
            return self._indexed_shards(INDEX_NAME)
        if (self.path / SINGLE_NAME).exists():
            return [SINGLE_NAME]
        if (self.path / PICKLE_INDEX_NAME).exists() or (self.path / PICKLE_SINGLE_NAME).exists():
            if not allow_pickle:
                raise DarwinError(f"{self.path} holds a pickle (.bin) checkpoint, which can run code when loaded; "
                                  "convert it to safetensors (or, for a file you trust, pass --allow-pickle to "
                                  "`darwin merge`)")
            self._pickled = True
            if (self.path / PICKLE_INDEX_NAME).exists():
                return self._indexed_shards(PICKLE_INDEX_NAME)
            return [PICKLE_SINGLE_NAME]
        raise DarwinError(f"no safetensors weights in {self.path} (expected {INDEX_NAME} or {SINGLE_NAME})")

    def _indexed_shards(self, index_name: str) -> list[str]:
        try:
            weight_map = json.loads((self.path / index_name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise DarwinError(f"corrupt index {self.path / index_name}: {exc!r}") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not (self.path / shard).exists():
                raise DarwinError(f"index {self.path / index_name} names a missing file: {shard}")
        return shards

    def _read_header(self, shard: str) -> Iterator[TensorInfo]:
        if self._pickled:
            import torch

            state = torch.load(self.path / shard, map_location="cpu", weights_only=True, mmap=True)
            self._pickled_states[shard] = state
            for name, tensor in state.items():
                yield TensorInfo(name, shard, st_dtype(tensor.dtype), tuple(tensor.shape))
            return
        try:  # safetensors validates the header and every byte range against the file's size
            handle = safe_open(self.path / shard, framework="numpy")
        except (SafetensorError, OSError) as exc:
            raise DarwinError(f"corrupt or truncated shard {self.path / shard}: {exc}") from None
        for name in handle.keys():
            piece = handle.get_slice(name)
            if piece.get_dtype() not in DTYPES:
                raise DarwinError(f"{name} in {self.path / shard} has dtype {piece.get_dtype()}, which darwin does not "
                                  f"read (it reads {', '.join(DTYPES)})")
            yield TensorInfo(name, shard, piece.get_dtype(), tuple(piece.get_shape()))

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(info.shard for info in self.tensors.values()))

    def names(self, shard: str | None = None) -> list[str]:
        return [n for n, info in self.tensors.items() if shard is None or info.shard == shard]

    def kind(self, name: str) -> tuple[str, int | None]:
        return self.family.classify(name)

    def read(self, name: str) -> torch.Tensor:
        info = self._info(name)
        if self._adapted(name):
            return self.adapter.apply(name, self._read_stored(name), torch_dtype(info.dtype))
        return self._read_stored(name)

    def _adapted(self, name: str) -> bool:
        return self.adapter is not None and (name in self.adapter.deltas or name in self.adapter.replaced)

    def _read_stored(self, name: str) -> torch.Tensor:
        info = self._info(name)
        if self._pickled:
            return self._pickled_states[info.shard][name]
        return to_torch(self._read_stored_array(name), info.dtype)

    def read_array(self, name: str) -> np.ndarray:
        """The tensor's raw bits (numpy dtype `raw_dtype(info.dtype)`, its shape): a view of the mapped shard, or
        the adapted weight of an adapter parent."""
        if self._adapted(name):
            return to_raw(self.read(name))
        return self._read_stored_array(name)

    def _read_stored_array(self, name: str) -> np.ndarray:
        info = self._info(name)
        if self._pickled:
            return to_raw(self._pickled_states[info.shard][name])
        mapped, data_start, offsets = self._mapped(info.shard)
        begin, end = offsets[name]
        data = mapped[data_start + begin:data_start + end]
        dtype = raw_dtype(info.dtype)
        if (data_start + begin) % dtype.itemsize:  # a writer that left this tensor unaligned: copy it out
            aligned = np.empty(info.numel, dtype=dtype)
            aligned.view(np.uint8)[:] = data
            data = aligned
        return data.view(dtype).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise DarwinError(f"tensor {name!r} is not in {self.path}")
        return info

    def _mapped(self, shard: str) -> tuple[np.ndarray, int, dict[str, list[int]]]:
        """The shard mapped copy-on-write, where its data starts, and each tensor's byte range: a read is a view of
        the page cache, where safetensors' get_tensor would copy every byte. safe_open has validated the header and
        the ranges against the file's size when the checkpoint was opened."""
        with self._lock:
            if shard not in self._maps:
                path = self.path / shard
                with open(path, "rb") as fh:
                    size = struct.unpack("<Q", fh.read(8))[0]
                    header = json.loads(fh.read(size))
                    mapped = np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
                header.pop("__metadata__", None)
                self._maps[shard] = (mapped, 8 + size, {name: entry["data_offsets"] for name, entry in header.items()})
            return self._maps[shard]

    @property
    def num_layers(self) -> int:
        blocks = [self.kind(n)[1] for n in self.tensors]
        return max((b for b in blocks if b is not None), default=-1) + 1

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def fingerprint(self) -> str:
        """Identity of the weights for cache keys: the sha256 of every shard's bytes and of config.json. A header or
        first bytes alone let two mothers that differ in a later tensor share every fitness entry."""
        digest = hashlib.sha256()
        files = [self.path / name for name in ("config.json", *self.shards)]
        if self.adapter is not None:
            files += [self.adapter.path / lora.CONFIG_NAME, self.adapter.path / lora.WEIGHTS_NAME]
        for path in files:
            if path.is_file():
                digest.update(f"{path.name}:{content_sha256(path)}\n".encode())
        return digest.hexdigest()[:16]

    def load_model(self, **kwargs):
        """The model transformers' AutoModelForCausalLM builds from this checkpoint (`kwargs` go to from_pretrained);
        an adapter parent's model is its base with the adapter merged by peft."""
        from transformers import AutoModelForCausalLM

        model = load_pretrained(AutoModelForCausalLM, self.path, **kwargs)
        if self.adapter is None:
            return model
        from peft import PeftModel

        return PeftModel.from_pretrained(model, self.adapter.path).merge_and_unload()


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per file and remembered (under CACHE_ROOT/sha256) by its resolved
    path, size and modification time: a 9B parent's 18 GB are read once, not at every run."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = CACHE_ROOT / "sha256" / hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    if memo.is_file():
        return memo.read_text()
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{uuid.uuid4().hex[:6]}")
    tmp.write_text(digest)
    tmp.replace(memo)
    return digest

