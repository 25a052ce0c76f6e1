"""darwin: evolve a child language model out of two fine-tunes of one base.

The science core: plain Python over tensors, paths and records. It never imports prefect (a test checks this);
Prefect lives in the `tasks` and `flows` packages above it.
"""

__version__ = "0.1.0"
