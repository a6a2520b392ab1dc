"""Read a grounding JSONL file and load its images (docs/method.md §7). Never touches the network.

``GroundingDataset(jsonl_path)[i]`` returns ``GroundingSample(record, image)``: the validated
``GroundingRecord`` and its image as an 8-bit RGB ``PIL.Image``. Record image paths are resolved
relative to the folder that holds the JSONL file.

``load_image(path)`` is the one image loader of the project (the converters use it too):

- JPEG / PNG / anything Pillow reads -> RGB. 16-bit or float greyscale (``I;16``, ``I``, ``F``)
  is min-max scaled to 8 bits first, since ``convert("RGB")`` would clip it.
- DICOM (``.dcm``/``.dicom`` suffix or the ``DICM`` magic at byte 128) through pydicom:
  first frame of a multi-frame file; the modality LUT (rescale slope/intercept) is applied; then
  greyscale is mapped to 8 bits with the file's own VOI window (centre/width, DICOM PS3.3
  C.11.2.1.2 linear function) when ``dicom_window="auto"`` and the file has one, else min-max;
  ``MONOCHROME1`` is inverted so that bright means dense as in ``MONOCHROME2``; palette colour
  goes through its lookup table; colour (``SamplesPerPixel == 3``) is returned as RGB (pydicom
  converts YBR to RGB), scaled from ``BitsStored`` to 8 bits when wider.

An unreadable image raises ``ImageLoadError`` naming the file and the reason.
"""

from __future__ import annotations

import os
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from PIL import Image

from medloc.data.records import GroundingRecord, read_records

DicomWindow = Literal["auto", "minmax"]
_DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load image {path}: {reason}")


def is_dicom_file(path: str) -> bool:
    """True if ``path`` has a DICOM suffix or carries the ``DICM`` magic at byte 128."""
    if path.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly map ``values`` so that min -> 0 and max -> 255 (a constant image maps to 0)."""
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _first_value(value: Any) -> float:
    """A DICOM DS attribute may be multi-valued (several windows); take the first."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window_to_unit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI window, as a fraction in [0, 1].

    ``y = ((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to [0, 1]; width must be >= 1.
    """
    width = max(width, 1.0 + 1e-6)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def dicom_to_rgb_array(ds: Any, *, window: DicomWindow = "auto") -> np.ndarray:
    """Convert a pydicom ``Dataset`` with pixel data to an 8-bit RGB array ``[H, W, 3]``."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    if window not in get_args(DicomWindow):
        raise ValueError(f"window={window!r}; expected one of {list(get_args(DicomWindow))}")
    arr = ds.pixel_array
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        arr = arr[0]  # first frame of a multi-frame file
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)  # [H, W, 3], entries of `bits` bits
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        scale = 255.0 / float(2**bits - 1)
        return np.clip(np.rint(rgb.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if samples == 3:
        if arr.dtype == np.uint8:
            return np.ascontiguousarray(arr)
        bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
        scale = 255.0 / float(2**bits - 1)
        return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if samples != 1 or arr.ndim != 2:
        raise ValueError(
            f"unsupported DICOM pixel layout: SamplesPerPixel={samples}, "
            f"PhotometricInterpretation={photometric}, array shape {arr.shape}"
        )

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)  # [H, W]
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if window == "auto" and center is not None and width is not None:
        unit = _window_to_unit(values, _first_value(center), _first_value(width))
        gray = np.rint(unit * 255.0).astype(np.uint8)
    else:
        gray = _minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_image(path: str | os.PathLike[str], *, dicom_window: DicomWindow = "auto") -> Image.Image:
    """Load any supported image file fully into memory as an 8-bit RGB ``PIL.Image``.

    Raises ``ImageLoadError`` (naming the file) when the file is missing or cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(path, "file does not exist")
    if is_dicom_file(path):
        try:
            import pydicom

            ds = pydicom.dcmread(path)
            rgb = dicom_to_rgb_array(ds, window=dicom_window)
        except Exception as exc:
            raise ImageLoadError(
                path, f"DICOM decode failed ({type(exc).__name__}: {exc})"
            ) from exc
        return Image.fromarray(rgb)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file must fail here, not later
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                gray = _minmax_to_uint8(np.asarray(img))
                return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
            return img.convert("RGB")
    except Exception as exc:
        raise ImageLoadError(path, f"{type(exc).__name__}: {exc}") from exc


class GroundingSample(NamedTuple):
    """One item of a ``GroundingDataset``."""

    record: GroundingRecord
    image: Image.Image  # 8-bit RGB, original size (record.width x record.height)


class GroundingDataset:
    """Map-style dataset over one grounding JSONL file (usable with a torch ``DataLoader``).

    Args:
        jsonl_path: the ``<split>.jsonl`` file; image paths are relative to its folder.
        check_size: raise if a loaded image's size differs from the record's ``width``/``height``
            (the box is in original pixels, so a mismatch would silently corrupt the target).
        dicom_window: how DICOM greyscale is mapped to 8 bits (see ``load_image``).
    """

    def __init__(
        self,
        jsonl_path: str | os.PathLike[str],
        *,
        check_size: bool = True,
        dicom_window: DicomWindow = "auto",
    ) -> None:
        self.jsonl_path = os.fspath(jsonl_path)
        self.root = os.path.dirname(os.path.abspath(self.jsonl_path))
        self.records: list[GroundingRecord] = read_records(self.jsonl_path)
        self.check_size = check_size
        self.dicom_window = dicom_window

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> str:
        """Absolute path of the image of record ``index``."""
        return os.path.normpath(os.path.join(self.root, self.records[index].image))

    def __getitem__(self, index: int) -> GroundingSample:
        record = self.records[index]
        path = self.image_path(index)
        image = load_image(path, dicom_window=self.dicom_window)
        if self.check_size and image.size != (record.width, record.height):
            raise ImageLoadError(
                path,
                f"image is {image.size[0]}x{image.size[1]} (WxH) but record {record.id!r} in "
                f"{self.jsonl_path} says {record.width}x{record.height}",
            )
        return GroundingSample(record, image)
