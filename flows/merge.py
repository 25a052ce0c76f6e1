"""`darwin merge`: one child from two parents and a genome, streamed tensor by tensor.

    darwin merge --father A --mother B --genome GENOME.json --method darwin-v5|darwin-v6|dare-ties [--base C]
                 [--mri-father DIR --mri-mother DIR] [--probes-father DIR --probes-mother DIR]
                 [--device cpu|cuda] [--strict] [--allow-pickle] --out OUT

Parents laid out differently merge by the pairing rules of README's "Merging a release with its fine-tune" (a
tensor one parent alone holds is carried from it, dtype-only differences merge in float32, wrapper-only architecture
differences merge); --strict refuses any difference.

This command calls the engine directly: on CPU it imports neither Prefect nor torch nor pandas, so it starts in
about 0.1 s; the evolution flow runs the same engine through `tasks.merge.merge_child`.
"""

from __future__ import annotations

import argparse
import json

from darwin.genome import Genome
from darwin.merge import METHODS, REPORT_NAME, merge_to_dir
from darwin.parents import Parents
from darwin.progress import Tracker
from darwin.runtime import pick_device
from flows.cli import device_type


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--father", required=True, help="parent A (the base of the darwin form)")
    parser.add_argument("--mother", required=True, help="parent B")
    parser.add_argument("--genome", required=True, help="JSON file of genes by their names (docs/method.md)")
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--base", help="the shared base model (dare-ties)")
    parser.add_argument("--mri-father", help="`darwin profile` output of the father (else computed on the fly)")
    parser.add_argument("--mri-mother", help="`darwin profile` output of the mother")
    parser.add_argument("--probes-father", help="`darwin probe` output of the father (V6 probe scores, experts)")
    parser.add_argument("--probes-mother", help="`darwin probe` output of the mother")
    parser.add_argument("--device", default="cpu", type=device_type, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pickle (.bin) parents, which can run code when loaded: trusted files only")
    parser.add_argument("--strict", action="store_true",
                        help="refuse parents that differ at all (tensor names, dtypes, architectures)")


def command(args: argparse.Namespace) -> int:
    genome = Genome.load(args.genome)
    parents = Parents(args.father, args.mother, args.method, args.base, args.mri_father, args.mri_mother,
                      args.probes_father, args.probes_mother)
    plan = parents.open(args.allow_pickle).plan(genome, args.strict)
    # a bar moved per tensor in a terminal (mergekit shows one too), nothing under -q or into a file or a pipe
    with Tracker("merge", unit="B") as progress:
        out = merge_to_dir(plan, args.out, device=pick_device(args.device), overwrite=args.overwrite,
                           progress=progress)
    report = json.loads((out / REPORT_NAME).read_text())
    rows = report["tensors"].values()
    transplants = sum(1 for row in rows if row.get("transplant"))
    carried = {role: sum(1 for row in rows if row.get("carried") == role) for role in ("father", "mother")}
    print(f"{out}  genome {genome.hash[:12]}  {len(report['tensors'])} tensors, {transplants} transplanted, "
          f"carried {carried['father']} from the father and {carried['mother']} from the mother, {report['seconds']} s")
    return 0


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(["merge", *sys.argv[1:]]))
