"""Writing reports: PNG bytes from a matplotlib Figure, and atomic writes of bytes, tables and JSON.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot global state), so worker threads can plot at
the same time. Every file is written to a temporary sibling and renamed: a reader never sees half a report.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from darwin.errors import DarwinError

if TYPE_CHECKING:  # pandas is imported where a table is read: `darwin merge` starts without it
    import pandas as pd


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return write_atomic(path, buffer.getvalue())


def write_json(path: Path, payload: dict) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2, default=str).encode())


def write_table(frame: pd.DataFrame, out: str | Path, stem: str, plot: bytes) -> Path:
    """`OUT/<stem>.parquet` and its picture `OUT/<stem>.png`; returns the parquet path."""
    write_atomic(Path(out) / f"{stem}.png", plot)
    return write_parquet(frame, Path(out) / f"{stem}.parquet")


def table_file(path: str | Path, stem: str, hint: str) -> Path:
    """The parquet file of a table written by `write_table`, given its directory or itself; `hint` says how to make
    it when it is missing."""
    path = Path(path)
    path = path / f"{stem}.parquet" if path.is_dir() else path
    if not path.is_file():
        raise DarwinError(f"{path} does not exist ({hint})")
    return path


def read_table(path: str | Path, stem: str, hint: str) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(table_file(path, stem, hint))


def read_columns(path: str | Path, stem: str, hint: str, columns: list[str]) -> dict[str, list]:
    """Some columns of a table as lists, through pyarrow alone: pandas' import costs 0.2 s more than pyarrow's, in
    a `darwin merge` that needs only these values. Missing values (NaN written from pandas) come back as None."""
    import pyarrow.parquet as pq

    # ParquetFile.read: read_table imports pandas to apply the pandas metadata that write_table stored
    return pq.ParquetFile(table_file(path, stem, hint)).read(columns=columns, use_pandas_metadata=False).to_pydict()
