"""Execute every notebook in notebooks/ so none can rot.

A notebook that needs packages beyond lora's own dependencies lists their import names in
its metadata, `{"lora": {"requires": ["torch", "transformers"]}}`; it is skipped (with the
reason) when one of them does not import, and run otherwise. Each notebook runs top to bottom
with nbclient in a fresh kernel of this interpreter, in a temporary working directory, against
the same `lora` these tests import; a cell that raises fails the test with the cell's error.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def requirements(path: pathlib.Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return list(nb.metadata.get("lora", {}).get("requires", []))


def test_the_notebooks_are_there():
    names = [p.name for p in NOTEBOOKS]
    assert "quickstart.ipynb" in names
    # The quickstart needs nothing optional: CI always executes it.
    assert requirements(NOTEBOOK_DIR / "quickstart.ipynb") == []


def test_notebooks_are_stored_without_outputs():
    """Outputs in git go stale and bloat diffs; CI regenerates them by running the notebook."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    missing = [m for m in requirements(path) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    import lora

    # The kernel must import the lora under test, wherever it is installed or built.
    package_parent = str(pathlib.Path(lora.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
