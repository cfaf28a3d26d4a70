"""`notebooks/explore.ipynb` runs top to bottom on CPU (a small pool and one evolution round)."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_explore_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("AGORA_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    notebook = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["multi"]) == 2 and all(len(accs) == 2 for accs in results["single"].values())
    assert all(0.0 <= a <= 1.0 for accs in results["single"].values() for a in accs)
    # the cells print the table and the transcript
    printed = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "| round |" in printed and "gold answer:" in printed
