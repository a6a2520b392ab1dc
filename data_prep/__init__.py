"""Raw datasets on disk -> the unified grounding JSONL (docs/method.md §7), plus phantom datasets.

- ``phantoms``: synthetic datasets written in the real on-disk layouts (the embedded default).
- ``build``: the phantom twin a run reads, generated and converted when missing
  (``python -m data_prep.build [run overrides]``; also a Hydra callback before every job).
- ``ham10000``, ``tn3k``, ``heel``: converters (``python -m data_prep.<name> --src RAW --out OUT``).
- ``coco``: export a split as a COCO detection annotation file.
- ``common``: mask -> box rules, the pixel convention, bad-input reporting, manifests.

Converted records point at the source images through paths relative to the output folder
(``os.path.relpath``); no image is copied, so keep the raw folder where it was.
"""
