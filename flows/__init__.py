"""darwin's Prefect flows and the `darwin` command line."""
