"""notebooks/sweep_report.ipynb runs top to bottom on the sweep of the end-to-end test (slow).

The notebook's cell tagged ``parameters`` names the sweep; as papermill does, a cell inserted after
it points ``SWEEP`` at the sweep of the ``table1_sweep`` fixture (conftest.py, shared with
test_sweep.py, so the sweep runs once). The kernel runs in a temporary folder (the notebook writes
``replay.png`` there).
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
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        f"SWEEP = Path({str(table1_sweep.sweep)!r})\nTABLE = 'table1'"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on an error

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert "Table 1" in text  # the table cell printed the Markdown table
    assert images >= 4, text[-2000:]  # the sweep's three plots and the replayed curriculum
    assert (tmp_path / "replay.png").stat().st_size > 1000
