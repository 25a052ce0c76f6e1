"""Publish a run or a model directory to `s3://bucket/prefix`, any fsspec URL, `file://` or a local path.

Every file is hashed (sha256) locally, in parallel, before it is uploaded (one extra local read, which the page
cache mostly absorbs: the hash decides what a re-run may skip, so it comes first); `manifest.json` (path, size,
sha256 of every file, the genome_hash and source commit when given, the creation time) is written LAST, so a
destination without a manifest is never taken for a complete release.

Resuming: after each file arrives, its size and sha256 are appended to `manifest.partial.json` at the destination.
A re-run skips a file when that journal (or a finished `manifest.json`) records the same sha256 as the local file
AND the object at the destination has the recorded size; everything else is uploaded again. The journal is read
back rather than the objects re-hashed (too slow for shards of many GB) or their ETags compared (a multipart ETag is
not an MD5 of the content, and not every fsspec store has one). It is deleted once the manifest is written.
Files already at DEST that are not part of this release are left alone: the manifest alone says what belongs.

S3 (s3fs): credentials, region and endpoint come from the standard AWS settings (environment, `AWS_PROFILE`,
config files); botocore itself honours `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible stores such as
MinIO. Files larger than two chunks go up as multipart uploads, `max_concurrency` parts at a time, and up to
`workers` files at once. Connection retries are bounded so that an unreachable endpoint fails within seconds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from darwin.errors import DarwinError

MANIFEST = "manifest.json"
JOURNAL = "manifest.partial.json"
CARD = "README.md"
FORMAT = "darwin-release/1"
# Bounded on purpose: botocore's own attempts times s3fs's retries of connection errors (5, about 2 s of sleeps).
S3_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 120}


class PublishInterrupted(DarwinError):
    """The upload stopped part-way (network, storage, a vanished file): re-running resumes where it stopped."""

    retryable = True


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_commit(start: str | Path | None = None) -> str | None:
    """The git commit of the darwin checkout (or of `start`), or None outside a git work tree."""
    where = Path(start) if start else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def release_files(source_dir: str | Path) -> dict[str, Path]:
    """Relative POSIX path -> local file, for every regular file under `source_dir` but a previous manifest."""
    root = Path(source_dir)
    if not root.is_dir():
        raise DarwinError(f"nothing to publish: {root} is not a directory")
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    for name in (MANIFEST, JOURNAL):
        files.pop(name, None)
    if not files:
        raise DarwinError(f"nothing to publish: {root} has no files")
    return files


def open_destination(dest: str, storage_options: dict | None = None):
    """(filesystem, root path) for DEST; S3 gets bounded retries and timeouts."""
    options = {"skip_instance_cache": True, **(storage_options or {})}
    if str(dest).startswith(("s3://", "s3a://")):
        options.setdefault("config_kwargs", S3_CONFIG)
    try:
        fs, root = fsspec.url_to_fs(str(dest), **options)
    except ImportError as exc:
        raise DarwinError(f"cannot publish to {dest}: {exc}") from exc
    except ValueError as exc:
        raise DarwinError(f"bad destination {dest!r}: {exc}") from exc
    return fs, root.rstrip("/")


def _storage_error(exc: BaseException, dest: str) -> DarwinError:
    """One line for what went wrong talking to DEST."""
    if isinstance(exc, DarwinError):
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return DarwinError(f"destination {dest} not found: {first}")
    if isinstance(exc, PermissionError):
        return DarwinError(f"access to {dest} denied (check the AWS credentials: AWS_ACCESS_KEY_ID, "
                           f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE): {first}")
    return DarwinError(f"cannot reach {dest}: {type(exc).__name__}: {first}")


def _check_destination(fs, root: str, dest: str) -> dict[str, int]:
    """Fail fast on a missing bucket, bad credentials or an unreachable endpoint; return remote path -> size."""
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)
        elif "s3" in fs.protocol:
            # A listing of a missing bucket can come back empty; HEAD on the bucket says 404 (or 403).
            bucket = root.split("/", 1)[0]
            try:
                fs.info(bucket)
            except FileNotFoundError as exc:
                raise DarwinError(f"bucket {bucket!r} does not exist (destination {dest})") from exc
        found = fs.find(root, detail=True) if fs.exists(root) else {}
    except Exception as exc:  # every storage failure becomes one line for the user
        raise _storage_error(exc, dest) from exc
    return {fs._strip_protocol(path): info.get("size") for path, info in found.items()}


def _read_json(fs, path: str) -> dict:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError):
        return {}  # a torn journal only costs re-uploads


def _recorded(fs, root: str) -> dict[str, dict]:
    """Relative path -> {size, sha256} of what a previous run says it uploaded (finished manifest, then journal)."""
    entries = {entry["path"]: entry for entry in _read_json(fs, f"{root}/{MANIFEST}").get("files", [])}
    entries.update(_read_json(fs, f"{root}/{JOURNAL}").get("files", {}))
    return entries


def publish(source_dir: str | Path, dest: str, *, card: str | None = None, extra: dict | None = None,
            workers: int = 4, max_concurrency: int = 4, chunksize: int = 64 * 2**20,
            storage_options: dict | None = None,
            on_uploaded: Callable[[str, int, int], None] | None = None) -> str:
    """Upload `source_dir` (plus `card` as README.md) to `dest`; return the URL of the manifest, written last.

    `extra` goes into the manifest as is (e.g. `genome_hash`, `commit`, `name`). `on_uploaded(rel_path, bytes done,
    bytes to upload)` is called after each file arrives (progress); an exception it raises interrupts the release
    like a network failure would. S3 memory bound: `workers * max_concurrency * chunksize` bytes in flight.
    """
    files = release_files(source_dir)
    fs, root = open_destination(dest, storage_options)
    remote_sizes = _check_destination(fs, root, dest)
    with tempfile.TemporaryDirectory(prefix="darwin-card-") as scratch:
        if card is not None:
            files[CARD] = Path(scratch) / CARD
            files[CARD].write_text(card, encoding="utf-8")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL on big blocks
            digests = dict(zip(files, pool.map(sha256_file, files.values()), strict=True))
        entries = {rel: {"path": rel, "size": path.stat().st_size, "sha256": digests[rel]}
                   for rel, path in files.items()}
        recorded = _recorded(fs, root)
        todo = [rel for rel, entry in entries.items()
                if recorded.get(rel, {}).get("sha256") != entry["sha256"]
                or remote_sizes.get(fs._strip_protocol(f"{root}/{rel}")) != entry["size"]]
        # what stays as a previous run left it, the journal's start
        journal = {rel: entry for rel, entry in recorded.items() if rel in entries and rel not in todo}
        put_options = {"max_concurrency": max_concurrency, "chunksize": chunksize} if "s3" in fs.protocol else {}
        if todo:
            _upload(_Target(fs, root, dest), {rel: (files[rel], entries[rel]) for rel in todo}, journal, workers,
                    put_options, on_uploaded)
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **{k: v for k, v in (extra or {}).items() if v is not None},
                "files": [entries[rel] for rel in sorted(entries)],
                "total_size": sum(entry["size"] for entry in entries.values())}
    try:
        fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
        if fs.exists(f"{root}/{JOURNAL}"):
            fs.rm_file(f"{root}/{JOURNAL}")
    except Exception as exc:
        raise PublishInterrupted(f"all files are at {dest} but the manifest was not written "
                                 f"({_storage_error(exc, dest)}); re-run to finish") from exc
    return f"{dest.rstrip('/')}/{MANIFEST}"


@dataclass(frozen=True)
class _Target:
    fs: fsspec.AbstractFileSystem
    root: str  # the destination as the filesystem names it
    dest: str  # as the user gave it, for messages


def _upload(target: _Target, todo: dict[str, tuple[Path, dict]], journal: dict[str, dict], workers: int,
            put_options: dict, on_uploaded: Callable[[str, int, int], None] | None) -> None:
    """Upload `todo` (relative path -> local file, manifest entry), `workers` files at once, biggest first, adding
    each arrival to the `journal`; any failure stops the rest."""
    fs, root, dest = target.fs, target.root, target.dest
    lock = threading.Lock()
    done = []
    to_upload = sum(entry["size"] for _, entry in todo.values())
    # An unfinished release must not look finished: the old manifest goes before the first byte changes.
    try:
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.pipe_file(f"{root}/{JOURNAL}", json.dumps({"files": journal}).encode())
            fs.rm_file(f"{root}/{MANIFEST}")
    except Exception as exc:
        raise _storage_error(exc, dest) from exc

    def send(rel: str) -> None:
        path, entry = todo[rel]
        remote = f"{root}/{rel}"
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(fs._parent(remote), exist_ok=True)
        fs.put_file(str(path), remote, **put_options)
        with lock:
            journal[rel] = entry
            fs.pipe_file(f"{root}/{JOURNAL}", json.dumps({"files": journal}).encode())
            done.append(rel)
            sent = sum(todo[r][1]["size"] for r in done)
        if on_uploaded is not None:
            on_uploaded(rel, sent, to_upload)

    order = sorted(todo, key=lambda rel: -todo[rel][1]["size"])
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="darwin-publish")
    futures = [pool.submit(send, rel) for rel in order]
    wait(futures, return_when=FIRST_EXCEPTION)
    pool.shutdown(wait=True, cancel_futures=True)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if errors:
        lines = str(errors[0]).strip().splitlines()
        reason = f"{type(errors[0]).__name__}: {lines[0] if lines else ''}"
        raise PublishInterrupted(f"upload to {dest} stopped after {len(done)} of {len(todo)} files ({reason}); "
                                 f"re-run the same command to resume") from errors[0]
