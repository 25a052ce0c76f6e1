"""darwin's Prefect tasks: thin wrappers around one core call each, with their retry and cache policy."""
