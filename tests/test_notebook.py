"""The quickstart notebook: committed executed on the whole benchmark, and run top to bottom in
quick mode (real data) by the tests."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _texts(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell printed or returned as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def _images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.fixture
def python3_kernel_of_this_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernel spec that runs ipykernel with this interpreter.

    ``JUPYTER_PATH`` comes first in the kernel-spec search, so a ``python3`` kernel installed in
    the user's or the system's Jupyter folders cannot hijack the run with another Python.
    """
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (fusion)", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _outputs(nb: nbformat.NotebookNode) -> tuple[list[nbformat.NotebookNode], list[str]]:
    code = [c for c in nb.cells if c.cell_type == "code"]
    return code, [_texts(c) for c in code]


def _check_sections(nb: nbformat.NotebookNode) -> None:
    """What every executed quickstart shows: the splits, the test metrics with the confusion
    matrix, the comparison (or how to make it) and the predictions."""
    code, texts = _outputs(nb)
    (counts_cell,) = [c for c in code if "dm.split_counts()" in c.source]
    counts = _texts(counts_cell)
    assert "train" in counts and "val" in counts and "test" in counts
    for label in ("civic", "commercial", "park", "railway_station", "residential", "school"):
        assert label in counts
    assert "not evaluable on new places (a single place, always trained on): ['park']" in counts

    (metrics,) = [t for t in texts if "test/OA" in t]
    assert "test/macro_f1" in metrics and "test/kappa" in metrics
    assert "test/ece_calibrated" in metrics
    assert _images(code[texts.index(metrics)]) == 1  # the confusion matrix written by test

    (comparison,) = [c for c in code if 'COMPARE / "compare.png"' in c.source]
    assert _images(comparison) == 1 or "fusion compare" in _texts(comparison)
    predictions = [c for c in code if "task.predict_step(" in c.source]
    assert len(predictions) == 1 and _images(predictions[0]) == 1
    # Figures: the tile + series, the confusion matrix and the predictions (at least).
    assert sum(_images(c) for c in code) >= 3


def test_the_committed_quickstart_was_executed_in_full_mode() -> None:
    """The repository shows the notebook's tables and figures on the whole benchmark."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code, texts = _outputs(nb)
    assert all(c.execution_count for c in code), "commit the notebook executed, top to bottom"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert "quick mode: False" in texts[0]
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    _check_sections(nb)
    (comparison,) = [c for c in code if 'COMPARE / "compare.png"' in c.source]
    assert _images(comparison) == 1  # the committed results/compare exists


def test_quickstart_notebook_runs_in_quick_mode(
    python3_kernel_of_this_venv: str, shared_data: Path, vit_weights: Path, monkeypatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run it as a new user would: nothing from the committed run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None

    # The kernel inherits this environment: quick sizes, the real data bundle.
    monkeypatch.setenv("FUSION_QUICK", "1")
    monkeypatch.setenv("FUSION_SHARED", str(shared_data.parent))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy start-up warning
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL_PREFIX=' + sys.prefix)"))

    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name=python3_kernel_of_this_venv,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # cwd = notebooks/
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    elapsed = time.perf_counter() - start
    print(f"notebook ran in {elapsed:.1f} s")

    _, texts = _outputs(nb)
    # The kernel is this virtual environment's Python, not whichever python3 Jupyter finds.
    assert f"KERNEL_PREFIX={sys.prefix}" in texts[-1]
    assert "quick mode: True" in texts[0]
    _check_sections(nb)
