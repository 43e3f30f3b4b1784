"""Conversions between Arrow tables and numpy batches (the stage format)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pairforge.stages.base import Batch


def table_to_batch(table: pa.Table) -> Batch:
    out: Batch = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks() if table.num_rows else table.column(name)
        if pa.types.is_fixed_size_list(col.type):
            out[name] = np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), col.type.list_size)
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type):
            arr = np.empty(len(col), dtype=object)
            arr[:] = col.to_pylist()
            out[name] = arr
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
