"""Checkpoint I/O: where a model lives, lazy reads by tensor name, and an atomic, streaming sharded writer.

A model is a local directory, a Hugging Face hub id (`org/name`, or `org/name@revision`), or any fsspec URL
(s3://...); a PEFT LoRA adapter on its base (`BASE+ADAPTER`, or an adapter naming its base) reads as the merged model
(darwin.lora). Weights are safetensors (sharded with `model.safetensors.index.json`, or one `model.safetensors`);
pickle checkpoints are refused unless asked for. Nothing here holds a whole model in memory: readers return one
tensor at a time, and the writer streams each tensor into its shard file behind a header written first (the plan
knows every shape in advance).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from darwin import lora
from darwin.errors import DarwinError
from darwin.kinds import Family, family_for_config
from darwin.runtime import CACHE_ROOT, load_pretrained

if TYPE_CHECKING:  # torch is imported where a tensor is made: `darwin merge` on CPU runs without it
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name@revision
REMOTE_CACHE = CACHE_ROOT / "remote"

# A tensor's dtype is its safetensors code (as in the shard header): the torch dtype of that name, and the numpy
# dtype that holds its bits. bf16 and fp8 have no numpy dtype; their bits ride in integers of the same width.
DTYPES = {
    "BOOL": ("bool", np.bool_), "U8": ("uint8", np.uint8), "I8": ("int8", np.int8), "I16": ("int16", np.int16),
    "I32": ("int32", np.int32), "I64": ("int64", np.int64), "U16": ("uint16", np.uint16),
    "U32": ("uint32", np.uint32), "U64": ("uint64", np.uint64), "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.int16), "F32": ("float32", np.float32), "F64": ("float64", np.float64),
    "F8_E4M3": ("float8_e4m3fn", np.uint8), "F8_E5M2": ("float8_e5m2", np.uint8),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
_BY_TORCH_NAME = {name: code for code, (name, _) in DTYPES.items()}


def dtype_name(code: str) -> str:
    """bfloat16 for BF16: the name users know from torch."""
    return DTYPES[code][0]


def raw_dtype(code: str) -> np.dtype:
    return np.dtype(DTYPES[code][1])


def torch_dtype(code: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[code][0])


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype."""
    return _BY_TORCH_NAME[str(dtype).removeprefix("torch.")]


def to_torch(raw: np.ndarray, code: str) -> torch.Tensor:
    """A tensor of dtype `code` over the memory of its raw bits (no copy)."""
    import torch

    return torch.from_numpy(raw).view(torch_dtype(code))


def to_raw(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor as a CPU numpy array (a view when the tensor is already contiguous on the CPU)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    return tensor.view(getattr(torch, raw_dtype(st_dtype(tensor.dtype)).name)).numpy()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * raw_dtype(self.dtype).itemsize


# ---------------------------------------------------------------------------------------------------------------
# Where a model lives
# ---------------------------------------------------------------------------------------------------------------

def resolve(model: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """A local directory holding the checkpoint: as given, downloaded from an fsspec URL into darwin's cache,
    or resolved through huggingface_hub's cache (offline mode and missing repos are one clear error). A hub
    model's own code (`*.py`) is fetched only when its code is trusted."""
    text = str(model)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" in text:
        return _fetch_remote(text)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DarwinError(f"model path is not a directory: {path}")
        return path
    if HUB_ID.match(text) and not text.startswith((".", "/")):
        return _fetch_hub(text, trust_remote_code)
    raise DarwinError(f"model path does not exist: {path}")


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def _fetch_hub(text: str, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = text.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=HUB_FILES + (["*.py"] if trust_remote_code else [])))
    except Exception as exc:  # offline mode, missing repo or revision, no network: all the same to the user
        raise DarwinError(f"model {text!r} is not a local directory and could not be fetched from the "
                          f"Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def split_adapter(model: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Path, Path | None]:
    """(the base's directory, the adapter's directory or None) of a parent: `BASE+ADAPTER`, an adapter directory or
    hub id whose adapter_config.json names its base, or a plain checkpoint."""
    text = str(model)
    if "+" in text and not Path(text).expanduser().exists():
        base, adapter = text.rsplit("+", 1)
        directory = resolve(adapter)
        if not lora.is_adapter(directory):
            raise DarwinError(f"{adapter} holds no {lora.CONFIG_NAME}: BASE+ADAPTER takes a PEFT adapter after the +")
        return resolve(base, trust_remote_code), directory
    path = resolve(text, trust_remote_code)
    if not lora.is_adapter(path) or (path / INDEX_NAME).exists() or (path / SINGLE_NAME).exists():
        return path, None
    base = json.loads((path / lora.CONFIG_NAME).read_text()).get("base_model_name_or_path")
    if not base:
        raise DarwinError(f"the adapter {path} names no base model (base_model_name_or_path): pass BASE+{text}")
    try:
        return resolve(base, trust_remote_code), path
    except DarwinError as exc:
        raise DarwinError(f"the base of the adapter {path}: {exc} (pass BASE+{text} to name it)") from None


def _fetch_remote(url: str) -> Path:
    """Copy an fsspec checkpoint into the local cache once (safetensors needs a local file to map lazily)."""
    import fsspec

    local = REMOTE_CACHE / hashlib.sha256(url.encode()).hexdigest()[:24]
    if (local / ".complete").exists():
        return local
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.isdir(root):
            raise DarwinError(f"model URL is not a directory: {url}")
        tmp = local.with_name(local.name + f".tmp-{uuid.uuid4().hex[:8]}")
        fs.get(root.rstrip("/") + "/", str(tmp), recursive=True)
    except DarwinError:
        raise
    except Exception as exc:
        raise DarwinError(f"cannot fetch model {url}: {type(exc).__name__}: {exc}") from None
    (tmp / ".complete").write_text(url)
    if local.exists():
        shutil.rmtree(local)
    tmp.rename(local)
    return local


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

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


# What must agree between the language models of two parents whose wrappers differ (ForConditionalGeneration of a
# release, ForCausalLM of its fine-tune): the text config's shape of the network and its vocabulary.
LANGUAGE_MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "intermediate_size", "vocab_size")
WRAPPERS = re.compile(r"For(CausalLM|ConditionalGeneration)$")


def language_model_config(config: dict) -> dict:
    text = config.get("text_config") or config
    return {key: text.get(key) for key in LANGUAGE_MODEL_KEYS if text.get(key) is not None}


def check_compatible(father: Checkpoint, mother: Checkpoint, base: Checkpoint | None = None, strict: bool = False,
                     limit: int = 5) -> None:
    """Refuse parents that cannot be merged tensor by tensor, naming the first problems (README: "Merging a release
    with its fine-tune").

    Allowed unless `strict`: tensors held by one parent only (carried), shared tensors that differ in dtype only
    (merged in float32), architectures that differ by the wrapper only when the language models agree. Always
    refused: a quantized parent, another family, language model or vocabulary, a shared tensor of another shape, and
    a tensor father and mother share but the base lacks."""
    for label, checkpoint in (("father", father), ("mother", mother), ("base", base)):
        if checkpoint is not None and checkpoint.config.get("quantization_config"):
            raise DarwinError(f"the {label} {checkpoint.path} is quantized (quantization_config in config.json): "
                              "merge the unquantized checkpoints")
    for label, other in (("mother", mother), ("base", base)):
        if other is None:
            continue
        problems = []
        arch_a, arch_b = father.config.get("architectures"), other.config.get("architectures")
        if arch_a and arch_b and arch_a != arch_b:
            same_model = [WRAPPERS.sub("", a) for a in arch_a] == [WRAPPERS.sub("", b) for b in arch_b]
            if strict or not same_model:
                problems.append(f"architectures {arch_a} vs {arch_b}")
        lm_a, lm_b = language_model_config(father.config), language_model_config(other.config)
        differ = [key for key in lm_a if key in lm_b and lm_a[key] != lm_b[key]]
        if father.family.name != other.family.name or differ:
            problems.append(f"language models differ ({father.family.name} vs {other.family.name}" +
                            "".join(f"; {key} {lm_a[key]} vs {lm_b[key]}" for key in differ) + ")")
        if strict or label == "base":
            only_a = [n for n in father.tensors if n not in other.tensors and (strict or n in mother.tensors)]
            problems += [f"{n} only in father" + ("" if strict else " and mother") for n in only_a[:limit]]
        if strict:
            problems += [f"{n} only in {label}" for n in other.tensors if n not in father.tensors][:limit]
        for name, info in father.tensors.items():
            peer = other.tensors.get(name)
            if peer is not None and (peer.shape != info.shape or (strict and peer.dtype != info.dtype)):
                problems.append(f"{name} {dtype_name(info.dtype)}{list(info.shape)} vs "
                                f"{dtype_name(peer.dtype)}{list(peer.shape)}")
            if len(problems) >= limit:
                break
        if problems:
            raise DarwinError(f"father and {label} do not match: " + "; ".join(problems[:limit]))


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

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
