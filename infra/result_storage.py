"""Save the Prefect result storage block that workers persist task results to, e.g. S3 (MinIO) in a real install.

    python infra/result_storage.py s3://darwin-results/prefect [--name darwin-results]

The block holds only the location. Credentials and the endpoint reach s3fs from the worker's environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), so they are never stored in Prefect's database, logs or
artifacts. Workers then run with PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=remote-file-system/<name> and
PREFECT_RESULTS_PERSIST_BY_DEFAULT=true.
"""

import argparse

from prefect.filesystems import RemoteFileSystem

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("url", help="fsspec URL of the result folder (s3://bucket/prefix, or a shared path)")
parser.add_argument("--name", default="darwin-results", help="block name (default darwin-results)")
args = parser.parse_args()
RemoteFileSystem(basepath=args.url).save(args.name, overwrite=True)
print(f"PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=remote-file-system/{args.name}")
