"""The quickstart notebook runs top to bottom (quick mode, real data) and shows its results."""

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


def test_quickstart_notebook_runs_in_quick_mode(
    python3_kernel_of_this_venv: str, shared_data: Path, vit_weights: Path, monkeypatch
) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    stored = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stored, "commit the notebook without outputs"

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

    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_texts(c) for c in code]
    # The kernel is this virtual environment's Python, not whichever python3 Jupyter finds.
    assert f"KERNEL_PREFIX={sys.prefix}" in texts[-1]
    assert "quick mode: True" in texts[0]

    (counts_cell,) = [c for c in code if "dm.split_counts()" in c.source]
    counts = _texts(counts_cell)
    assert "train" in counts and "val" in counts
    for label in ("civic", "commercial", "park", "railway_station", "residential", "school"):
        assert label in counts

    (metrics,) = [t for t in texts if "test/OA" in t]
    assert "test/macro_f1" in metrics and "test/kappa" in metrics
    metrics_cell = code[texts.index(metrics)]
    assert _images(metrics_cell) == 1  # the confusion matrix PNG written by trainer.test

    ablation = [c for c in code if "ABLATION_PNG.is_file()" in c.source]
    assert len(ablation) == 1
    assert _images(ablation[0]) == 1 or "fusion ablate" in _texts(ablation[0])

    # Figures: the tile + series, the confusion matrix and the predictions (at least).
    assert sum(_images(c) for c in code) >= 3
    predictions = [c for c in code if ".softmax(-1)" in c.source]
    assert len(predictions) == 1 and _images(predictions[0]) == 1
