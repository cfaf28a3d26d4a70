"""`notebooks/explore.ipynb` runs top to bottom on CPU (a small pool and one evolution round), and what it
shows is the run of its config: the numbers `evolve` gives for that config, the outputs it stored."""

import pathlib

import pytest

from stored_outputs import assert_results_are_the_stored_outputs, markdown_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


def notebook_config():
    """The config the notebook's cells build (its "The config" cell, setting for setting)."""
    from agora_jax.evolution.config import base_config
    from agora_jax.strategies.debate import defaults

    config = base_config("default", defaults())
    config.rounds = 1
    config.strategy.rounds = 1
    config.strategy.num_agents = 6
    config.pool.pretrain_steps = 80
    config.task.n_dev = 48
    config.task.n_test = 48
    return config


@pytest.mark.slow
def test_explore_notebook_shows_the_run_of_its_config(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from agora_jax.evolution import report
    from agora_jax.evolution.loop import evolve

    workdir = tmp_path / "run"
    monkeypatch.setenv("AGORA_JAX_NOTEBOOK_WORKDIR", str(workdir))
    notebook = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    printed = "".join(out["text"] for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []) if out.get("name") == "stdout")

    # `evolve` with the same config continues the notebook's run (a different config is refused there)
    # and gives its numbers: the table the notebook printed, re-graded from the outputs the run stored
    results = evolve(notebook_config(), workdir)
    assert len(results["multi"]) == 2 and set(results["single"]) == {"m0", "m1", "m2"}
    assert markdown_rows(printed) == markdown_rows(report.markdown_table(results))
    assert_results_are_the_stored_outputs(workdir, "debate")
    assert "gold answer:" in printed  # the transcript cell ran
