"""darwin's Prefect flows and the `darwin` command line.

Importing this package sets darwin's defaults for Prefect before Prefect reads its settings (it reads them once,
when first imported); a value the user set in the environment wins.
"""

import os

# Prefect's temporary API server creates its SQLite database on the first run. With a fresh PREFECT_HOME on two busy
# cores that takes longer than Prefect's default 20 s, and the command would die (docs/operations.md).
EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 180

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_SECONDS))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
