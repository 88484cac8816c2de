"""The notebooks in notebooks/ run top to bottom in a fresh kernel of this interpreter; a failing cell fails
the test (and CI). They are committed with their outputs cleared."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the test extras (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="needs the test extras (pip install -e '.[test]')")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_quantization", "03_tensor_parallel", "04_benchmark"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    stale = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not stale, f"{path.name}: cells {stale} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from hf_fastinfer import models

    models.default_model_path()  # convert once, outside the notebook's cells
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    # the kernel must be this interpreter (the one with hf_fastinfer installed), not another python3 on the PATH
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"))
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    if path.stem == "04_benchmark":
        assert (tmp_path / "bench.png").stat().st_size > 30_000
        images = [out for cell in notebook.cells for out in cell.get("outputs", [])
                  if "image/png" in out.get("data", {})]
        assert images, "the chart is not shown inline"
