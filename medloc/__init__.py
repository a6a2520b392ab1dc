"""medloc: MedLoc-R1 (performance-aware IoU-threshold curriculum for GRPO medical visual grounding).

See README.md for the two commands that matter and PAPER.md-derived deviations list.
"""

__version__ = "0.1.0"
