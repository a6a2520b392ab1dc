"""Synthetic "phantom" datasets written in each real dataset's ON-DISK LAYOUT (docs/method.md §7).

The embedded default has no real data, so these phantoms stand in for it; because they use the
real layouts, the real converters (``data_prep.ham10000`` / ``tn3k`` / ``heel``) run end to end.

Layouts (``make_phantom(kind, out_dir, ...)``)
----------------------------------------------
- ``ham10000``: ``ISIC_XXXXXXX.jpg``, ``ISIC_XXXXXXX_segmentation.png`` (0/255) and
  ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization``); several
  photos per lesion (``images_per_lesion``), each a jittered view of the same lesion.
- ``tn3k``: ``trainval-image/NNNN.jpg``, ``trainval-mask/NNNN.jpg`` (JPEG masks: lossy),
  ``test-image/``, ``test-mask/``, ``tn3k-trainval-fold{0..4}.json`` (``{"train", "val"}``
  image numbers, which are also the positions in the sorted trainval list); a fraction
  ``multi_target_frac`` (default 0.12, near the real test set's share of multi-nodule masks;
  ``data_prep.tn3k`` gives that share and how it is counted) of the masks hold two nodules.
- ``heel``: ``images/heel_NNNNN.png`` and ``annotations.jsonl`` (``{"image", "bbox"}``, pixel xyxy)
  or ``annotations.csv`` (``image,x1,y1,x2,y2``); with ``heel_annotation="mask"`` it writes
  ``masks/heel_NNNNN.png`` and rows ``{"image", "mask"}`` instead.
Each folder also gets ``phantom.json`` (generator parameters and counts); converters ignore it.

Appearance
----------
- dermoscopy (ham10000): brown lesion with a darker core and a soft edge on textured skin, dark
  dermatoscope corners;
- ultrasound (tn3k): Rayleigh speckle inside a sector (fan), depth attenuation, a dark
  (hypoechoic) nodule;
- X-ray (heel): dark background, soft-tissue and bone densities with striped trabecular texture,
  a small denser target.

Difficulty (``Difficulty``): ``size_range`` = the target's nominal major diameter as a fraction of
the SHORTER image side; ``contrast`` in [0, 1] scales how far the target's intensity/colour moves
away from the background (1 = the modality's full contrast); ``noise`` = standard deviation of
additive Gaussian noise in [0, 1] intensity units. Two presets per kind: ``"easy"`` (large,
high-contrast targets: the stand-in pretraining data) and ``"hard"`` (small, faint targets drawn by
the SAME renderer, same shapes and colours, so they look like shrunken, fainter easy targets).

Ground truth: a target's mask is ``alpha >= 0.5`` of its soft silhouette; a mask covering columns
``x0..x1`` and rows ``y0..y1`` has box ``[x0, y0, x1 + 1, y1 + 1]`` (``data_prep.masks``).

Determinism: every random draw comes from ``numpy.random.default_rng([seed, kind code, ...])``
and files are written by Pillow with fixed settings, so the same arguments give the same bytes.
Images are rendered with vectorised numpy over the pixel grid (no per-pixel Python loop).
"""

from data_prep.phantoms.make import main, make_phantom
from data_prep.phantoms.spec import (
    KINDS,
    MARKER,
    PRESETS,
    Difficulty,
    HeelAnnotation,
    HeelFormat,
    PhantomImage,
    PhantomKind,
    PhantomSummary,
    Preset,
    resolve_difficulty,
)

__all__ = [
    "KINDS",
    "MARKER",
    "PRESETS",
    "Difficulty",
    "HeelAnnotation",
    "HeelFormat",
    "PhantomImage",
    "PhantomKind",
    "PhantomSummary",
    "Preset",
    "main",
    "make_phantom",
    "resolve_difficulty",
]
