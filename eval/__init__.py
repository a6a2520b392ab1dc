"""Evaluation commands (docs/method.md §5): evaluate, score, seed aggregation, significance tests, tables, plots.

The work they call is library code: decoding and scoring a checkpoint in ``medloc.evaluation``,
the metrics (Acc@t, pseudo-mAP, mean IoU, parse-failure rate, Acc by lesion-size tercile, COCO AP
with the answer tokens' confidence) in ``medloc.metrics``. Nothing in ``medloc`` imports ``eval``.

- ``eval.evaluate``: ``python -m eval.evaluate eval.checkpoint=...`` evaluates any checkpoint.
- ``eval.score``: ``python -m eval.score PRED.jsonl`` scores any predictions file.
- ``eval.significance``: paired t-test over seeds, exact sign-flip test over test images (seeds
  kept together), McNemar and paired bootstrap over single-seed samples.
- ``eval.table``: ``python -m eval.table SWEEP_DIR`` builds the paper's tables from run folders:
  ``eval.runs`` finds the runs, ``eval.cells`` aggregates a row's seeds and tests it against the
  reference row, ``eval.table_spec`` says what each table holds, ``eval.render`` writes
  Markdown / LaTeX / CSV.
- ``eval.plots``: training curves and Acc@t curves as PNG (``eval.style``: words for metric keys,
  the tables' arm names, one fixed colour and line style per arm).
- ``eval.mechanism``: ``python -m eval.mechanism SWEEP_DIR`` writes the sweep's reward-sparsity and
  dead-group / τ-raise tables (Markdown, LaTeX, CSV) from its JSON files.
- ``eval.summary``: ``python -m eval.summary RUN_DIR`` prints what one run did (steps, τ path,
  reward, evaluation, files) and draws its training curves; ``make demo`` ends with it.
- ``eval.replay_panel``: ``python -m eval.replay_panel SWEEP_DIR --table criteria`` replays every
  arm of an ablation table on the IoUs the full rule's runs recorded (``eval.tau_paths``: τ paths,
  replayed or trained, and where two part).
- ``eval.paper_numbers``: the paper's reported numbers (docs/method.md §6) as data.
"""
