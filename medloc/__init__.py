"""medloc: MedLoc-R1 (performance-aware IoU-threshold curriculum for GRPO medical visual grounding).

See README.md for the two commands that matter, docs/method.md for the method and docs/deviations.md for every choice the paper leaves open.
"""

__version__ = "0.1.0"
