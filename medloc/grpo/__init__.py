"""GRPO (docs/method.md §2): group advantages, the clipped-surrogate loss, rollout and the trainer loop."""
