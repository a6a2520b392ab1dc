"""Grounding data: the unified record schema, its JSONL reader/writer and the dataset reader.

See ``records.py`` for the record format (docs/method.md §7) and ``dataset.py`` for image loading
(JPEG/PNG/DICOM -> 8-bit RGB).
"""

from medloc.data.dataset import GroundingDataset, GroundingSample, ImageLoadError, load_image
from medloc.data.records import (
    SPLITS,
    GroundingRecord,
    RecordError,
    Split,
    read_records,
    write_records,
)

__all__ = [
    "SPLITS",
    "GroundingDataset",
    "GroundingRecord",
    "GroundingSample",
    "ImageLoadError",
    "RecordError",
    "Split",
    "load_image",
    "read_records",
    "write_records",
]
