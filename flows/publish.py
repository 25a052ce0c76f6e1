"""Release flow, last step: publish a run (or one model) with a generated model card and a manifest written last.

    darwin publish RUN_OR_MODEL DEST [--card-from RUN] [--no-card]

DEST is `s3://bucket/prefix` (credentials and endpoint from the standard AWS settings, `AWS_ENDPOINT_URL` for
MinIO and other S3-compatible stores), any fsspec URL, `file://...` or a local path. Re-running after an
interruption uploads only what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from darwin.errors import DarwinError
from darwin.modelcard import model_card, run_info_from_dir
from darwin.publish import release_files, source_commit
from tasks.publish import publish_release


@flow(name="darwin-publish", log_prints=True)
def publish_flow(source: str, dest: str, card_from: str | None = None, card: bool = True) -> str:
    info = {**run_info_from_dir(card_from or source, release=source), "location": dest}
    extra = {"name": info["name"], "genome_hash": info.get("genome_hash"), "commit": source_commit()}
    return publish_release(source, dest, card=model_card(info) if card else None, extra=extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_MODEL", help="a run directory (with best/) or a model directory")
    parser.add_argument("dest", metavar="DEST", help="s3://bucket/prefix, any fsspec URL, file://... or a path")
    parser.add_argument("--card-from", metavar="RUN", help="build the model card from this run (default: SOURCE)")
    parser.add_argument("--no-card", action="store_true", help="upload without a generated README.md")


def command(args: argparse.Namespace) -> int:
    release_files(args.source)  # bad input fails here, before Prefect starts
    if args.card_from and not Path(args.card_from).is_dir():
        raise DarwinError(f"--card-from {args.card_from} is not a directory")
    print(publish_flow(args.source, args.dest, args.card_from, not args.no_card))
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["publish", *sys.argv[1:]]))
