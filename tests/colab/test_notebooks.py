"""The Colab notebooks run top to bottom, offline, at small size, and are committed without outputs.

Each notebook is executed by nbclient in a fresh kernel from the repository root with
`FGJAX_NOTEBOOK_SMALL=1` (its small-size switch); any cell that raises fails the test.
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_the_three_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {
    "quickstart.ipynb",
    "last_mile_demo.ipynb",
    "loss_landscape.ipynb",
  }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_opens_with_an_install_cell(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs in git"
  first_code = next(c for c in notebook.cells if c.cell_type == "code")
  assert "google.colab" in first_code.source and "pip install" in first_code.source
  assert any("FGJAX_NOTEBOOK_SMALL" in c.source for c in notebook.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_top_to_bottom_at_small_size(path, monkeypatch, tmp_path):
  monkeypatch.setenv("FGJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  # At small size compilation is nearly all the cost: XLA's CPU backend without LLVM optimization
  # compiles about a quarter faster, and the tiny runs don't notice the slower code.
  monkeypatch.setenv(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false "
    "intra_op_parallelism_threads=1",
  )
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(ROOT)}},
  )
  client.execute()  # Raises CellExecutionError on the first failing cell.
