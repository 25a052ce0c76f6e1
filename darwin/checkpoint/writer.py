"""Writing a checkpoint: shards streamed tensor by tensor behind a header written first, in a temporary sibling
directory renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from darwin.checkpoint.dtypes import raw_dtype, st_dtype, to_raw
from darwin.checkpoint.location import INDEX_NAME, WEIGHT_SUFFIXES
from darwin.errors import DarwinError

if TYPE_CHECKING:  # torch is imported where a tensor is made: `darwin merge` on CPU runs without it
    import torch


def _header_bytes(specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict | None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        size = raw_dtype(dtype).itemsize
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardStream:
    """One safetensors file written tensor by tensor, in the order of its specs.

    safetensors' own writer needs every tensor in memory at once; this writes the same format (header with all
    offsets first, then the raw bytes) so a shard never has to be held whole.
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata=None):
        self.path = path
        self.specs = specs
        self._next = 0
        self._fh = open(path, "wb")
        self._fh.write(_header_bytes(specs, metadata))

    def write(self, name: str, data: np.ndarray | torch.Tensor | Iterable[np.ndarray]) -> None:
        """`data`: a tensor, raw bits as `Checkpoint.read_array` gives them, or the raw bits of its slices along
        dim 0, in order (each written before the next is asked for)."""
        expected_name, dtype, shape = self.specs[self._next]
        whole = hasattr(data, "shape")
        rows = 0
        for piece in [data] if whole else data:
            if isinstance(piece, np.ndarray):  # raw bits say only their width: fp8 of either kind come as uint8
                raw, got, same_dtype = piece, piece.dtype, piece.dtype == raw_dtype(dtype)
            else:
                raw, got = to_raw(piece), st_dtype(piece.dtype)
                same_dtype = got == dtype
            fits = tuple(piece.shape) == (tuple(shape) if whole else tuple(shape[1:]))
            if name != expected_name or not same_dtype or not fits:
                raise ValueError(f"{self.path.name}: expected {expected_name} {dtype}{list(shape)}, "
                                 f"got {name} {got}{list(piece.shape)}{'' if whole else ' as a slice'}")
            self._fh.write(memoryview(np.ascontiguousarray(raw).reshape(-1).view(np.uint8)))
            rows += 1
        if not whole and rows != shape[0]:
            raise ValueError(f"{self.path.name}: {expected_name} got {rows} of its {shape[0]} slices")
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.specs):
            raise ValueError(f"{self.path.name}: {len(self.specs) - self._next} tensors were never written")


class CheckpointWriter:
    """An HF checkpoint written into a temporary sibling directory and renamed into place by `commit()`.

    Either stream shards whose layout is known (`shard(...)`, as the merge does, mirroring the father), or
    `add()` tensors one by one and let the writer cut shards at `max_shard_bytes`. The index is written last,
    then the side files (config, tokenizer, generation config) are copied from `template`.
    """

    def __init__(self, out: str | os.PathLike, template: Path | None = None, max_shard_bytes: int = 5 << 30,
                 metadata: dict | None = None, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise DarwinError(f"output already exists: {self.out}")
        self.template = template
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._auto_shards = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def shard(self, filename: str, specs: list[tuple[str, str, tuple[int, ...]]]) -> ShardStream:
        for name, _, _ in specs:
            self.weight_map[name] = filename
        return ShardStream(self.tmp / filename, specs, self.metadata)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._pending.append((name, tensor))
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self._auto_shards += 1
        filename = f"model-{self._auto_shards:05d}.safetensors"
        stream = self.shard(filename, [(n, st_dtype(t.dtype), tuple(t.shape)) for n, t in self._pending])
        for name, tensor in self._pending:
            stream.write(name, tensor)
        stream.close()
        self._pending, self._pending_bytes = [], 0

    def write_text(self, relative: str, text: str) -> None:
        (self.tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.tmp / relative).write_text(text)

    def _name_auto_shards(self) -> None:
        """HF names shards model-0000i-of-0000N; N is only known once every shard is written."""
        total = self._auto_shards
        renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors"
                   for i in range(1, total + 1)}
        for old, new in renames.items():
            (self.tmp / old).rename(self.tmp / new)
        self.weight_map = {n: renames.get(f, f) for n, f in self.weight_map.items()}

    def commit(self) -> Path:
        self._flush()
        if self._auto_shards:
            self._name_auto_shards()
        if self.template is not None:
            copy_side_files(Path(self.template), self.tmp)
        total = sum((self.tmp / f).stat().st_size for f in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total, **{k: v for k, v in self.metadata.items() if k != "format"}},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def copy_side_files(source: Path, dest: Path) -> None:
    """Config, tokenizer, generation and processor files: every top-level file that is not weights or index, nor
    the source's model card (a card describes one model: a merge or quantization of it gets darwin's own)."""
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not item.name.endswith(".index.json") \
                and not item.name.startswith(".") and item.name != "README.md":
            shutil.copy2(item, dest / item.name)
