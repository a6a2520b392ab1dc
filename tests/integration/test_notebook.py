"""notebooks/sweep_report.ipynb runs top to bottom on the sweep of the end-to-end test (slow).

The notebook's cell tagged ``parameters`` names the sweep; as papermill does, a cell inserted after
it points ``SWEEP`` at the sweep of the ``table1_sweep`` fixture (conftest.py, shared with
test_sweep.py, so the sweep runs once) and ``OUT`` at a temporary folder. The notebook must write
everything there and nothing into the sweep folder (issue 20, finding 7), and replay the MedLoc-R1
arm's own run with its own curriculum: the replayed τ path equals the trained one.
(``eval.runs.pick_run``, which chooses that run: tests/unit/test_eval_summary.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "sweep_report.ipynb"


@pytest.mark.slow
def test_sweep_report_notebook_runs_on_the_sweep(table1_sweep, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    out = tmp_path / "report"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        f"SWEEP = Path({str(table1_sweep.sweep)!r})\nTABLE = 'table1'\nOUT = Path({str(out)!r})"))

    def snapshot(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
                for p in root.rglob("*") if p.is_file()}

    before = snapshot(table1_sweep.sweep)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on an error
    assert snapshot(table1_sweep.sweep) == before, "the notebook changed the sweep folder"

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert "Table 1" in text  # the table cell printed the Markdown table
    assert images >= 4, text[-2000:]  # the sweep's three plots and the replayed curriculum
    assert (out / "table1.md").is_file() and list((out / "plots").glob("*.png"))
    assert (out / "replay.png").stat().st_size > 1000
    # the MedLoc-R1 arm's run, labelled, replayed with its own curriculum: the same τ path
    assert "MedLoc-R1 · " in text and "schedule medloc" in text, text[-2000:]
    replayed = next(ln for ln in text.splitlines() if ln.startswith("τ path, replayed:"))
    trained = next(ln for ln in text.splitlines() if ln.startswith("τ path, trained: "))
    assert replayed.split(":", 1)[1].strip() == trained.split(":", 1)[1].strip()
