"""Shards for tests, written through the shard contract (pipelines.data.shards): its schema and file names."""
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.data import shards


def sample_row(sample_id: str, image: np.ndarray, label: np.ndarray, source: str = "sbd") -> dict:
    """A shard row: an (H, W, 3) uint8 image as JPEG, an (H, W) uint8 label as PNG."""
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image, "RGB").save(jpeg, "JPEG", quality=95)
    Image.fromarray(label, "L").save(png, "PNG")
    return {"id": sample_id, "source": source, "image": jpeg.getvalue(), "label": png.getvalue(),
            "height": image.shape[0], "width": image.shape[1]}


def write_split(split_dir: Path, rows: list[dict], rows_per_file: int | None = None) -> list[Path]:
    """rows as the contract's part-NNNNN.parquet files in split_dir, rows_per_file each (one file by default)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    step = rows_per_file or max(len(rows), 1)
    paths = []
    for index, start in enumerate(range(0, len(rows), step)):
        chunk = rows[start:start + step]
        table = pa.table({name: [row[name] for row in chunk] for name in shards.COLUMN_NAMES}, schema=shards.schema())
        paths.append(shards.shard_path(split_dir, index))
        pq.write_table(table, paths[-1])
    return paths
