"""Evaluation (PAPER.md §5): scoring predictions, seed aggregation, significance tests, tables, plots.

- ``eval.metrics``: Acc@t, pseudo-mAP, mean IoU, parse-failure rate, Acc by lesion-size tercile,
  COCO AP when predictions carry a confidence (``answer_confidence``: from the answer tokens).
- ``eval.score``: ``python -m eval.score PRED.jsonl`` scores any predictions file.
- ``eval.significance``: paired t-test over seeds, exact sign-flip test over test images (seeds
  kept together), McNemar and paired bootstrap over single-seed samples.
- ``eval.table``: ``python -m eval.table SWEEP_DIR`` builds the paper's tables from run folders.
- ``eval.plots``: training curves and Acc@t curves as PNG.
- ``eval.paper_numbers``: the paper's reported numbers (PAPER.md §6) as data.
"""
