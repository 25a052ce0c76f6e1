"""Publish throughput: hashing, a first upload, a no-op re-run, to moto's S3 server on 127.0.0.1 and to a local path.

moto keeps objects in Python memory, so its figure is a floor for what s3fs does, not the speed of a real store;
the re-run line shows what resuming costs (hash + one listing, no upload).
Run: python bench/publish_s3.py [--mib 256] [--files 4] [--workers 4] [--concurrency 4] [--chunk-mib 16]
"""

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256, help="total size of the shards")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunk-mib", type=int, default=16)
    args = parser.parse_args()

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from darwin.publish import publish, release_files, sha256_file

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    boto3.client("s3").create_bucket(Bucket="bench")

    with tempfile.TemporaryDirectory(prefix="darwin-bench-publish-") as tmp:
        source = Path(tmp) / "model"
        source.mkdir()
        for i in range(args.files):
            (source / f"model-{i + 1:05d}-of-{args.files:05d}.safetensors").write_bytes(
                os.urandom(args.mib * 2**20 // args.files))
        total = args.mib
        options = {"workers": args.workers, "max_concurrency": args.concurrency, "chunksize": args.chunk_mib * 2**20}
        hashing = timed(lambda: [sha256_file(p) for p in release_files(source).values()])
        print(f"{total} MiB in {args.files} files; workers {args.workers}, {args.concurrency} parts of "
              f"{args.chunk_mib} MiB in flight per file")
        print(f"sha256 alone (one thread):       {hashing:6.2f} s  {total / hashing:7.0f} MiB/s")
        for label, dest in (("moto S3", "s3://bench/release"), ("local path", str(Path(tmp) / "out"))):
            first = timed(lambda dest=dest: publish(source, dest, **options))
            again = timed(lambda dest=dest: publish(source, dest, **options))
            print(f"{label:10s} first upload:        {first:6.2f} s  {total / first:7.0f} MiB/s")
            print(f"{label:10s} re-run (all skipped): {again:6.2f} s")
    server.stop()


if __name__ == "__main__":
    main()
