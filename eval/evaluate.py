"""Evaluate a checkpoint from the command line: greedy decoding on a split -> predictions.jsonl ->
metrics.json (docs/method.md §5), with the run's config groups and overrides.

    python -m eval.evaluate eval.checkpoint=runs/x/final dataset=phantom_ham10000 \
        reward.answer_format=bare_list hydra.run.dir=runs/x/eval_again

Without ``eval.checkpoint`` the configured model is evaluated (zero-shot). The work is
``medloc.evaluation.evaluate_checkpoint`` (the function ``medloc.train`` runs after training);
the files and the confidence used for COCO AP are described there.
"""

from __future__ import annotations

import json
from pathlib import Path


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from medloc.config import register_configs, to_run_config
    from medloc.evaluation import evaluate_checkpoint
    from medloc.logging import console
    from medloc.prepare import ensure_model, require_dataset

    register_configs()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def main(cfg) -> None:
        run_cfg = to_run_config(cfg)
        require_dataset(run_cfg.dataset)
        checkpoint = run_cfg.eval.checkpoint or ensure_model(run_cfg.model)
        out = Path(HydraConfig.get().runtime.output_dir)
        metrics = evaluate_checkpoint(checkpoint=checkpoint, dataset=run_cfg.dataset,
                                      eval_cfg=run_cfg.eval,
                                      answer_format=run_cfg.reward.answer_format,
                                      parse_rule=run_cfg.reward.parse_rule, out_dir=out)
        console(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))

    main()


if __name__ == "__main__":
    _main()
