"""Where a model lives: a local directory, a hub id (`org/name@revision`), an fsspec URL, or `BASE+ADAPTER`; resolved
to a local directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from darwin import lora
from darwin.errors import DarwinError
from darwin.runtime import CACHE_ROOT

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name@revision
REMOTE_CACHE = CACHE_ROOT / "remote"


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

