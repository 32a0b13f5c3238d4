"""Unsaved edits to the `#| export` cells, found before api.py is exported from the saved notebook.

The export reads the notebook FILE; JupyterLab's Run All does not save it first. So an export cell changed
and run but not saved would be served as its old version, silently. Notebook 04 starts a watch in its first
cell; its export cell then refuses while an export cell has run, since the file was last saved, with a
source the file does not hold:

    runs = watch()                      # the setup cell: records each `#| export` cell this kernel runs
    stale = unsaved(NOTEBOOK, runs)     # the export cell: [] when the file holds what ran
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from serving.notebook.export import is_export_cell


class ExportRuns:
    """IPython post_run_cell hook: (time, source) of every `#| export` cell run in this kernel."""

    def __init__(self):
        self.runs: list = []

    def __call__(self, result) -> None:
        source = getattr(getattr(result, "info", None), "raw_cell", None) or ""
        if _is_export_source(source):
            self.runs.append((time.time(), source))


def watch(shell=None) -> ExportRuns:
    """Start recording the export cells this kernel runs (once per kernel: a second call returns the first)."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    existing = getattr(shell, "_qv_export_runs", None)
    if existing is not None:
        return existing
    runs = ExportRuns()
    shell.events.register("post_run_cell", runs)
    shell._qv_export_runs = runs
    return runs


def unsaved(notebook: Path, runs: ExportRuns) -> list:
    """First lines after `#| export` of the export cells run after `notebook` was last saved whose source the
    saved file does not hold (edited, run, not saved)."""
    path = Path(notebook)
    saved_at = path.stat().st_mtime
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    saved = {_normal(_source(c)) for c in cells if is_export_cell({**c, "source": _source(c)})}
    stale = []
    for ran_at, source in runs.runs:
        if ran_at > saved_at and _normal(source) not in saved:
            lines = [line for line in source.splitlines()[1:] if line.strip()]
            stale.append(lines[0].strip() if lines else "(empty cell)")
    return list(dict.fromkeys(stale))


def _source(cell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _is_export_source(source: str) -> bool:
    return is_export_cell({"cell_type": "code", "source": source})


def _normal(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.replace("\r\n", "\n").strip().split("\n"))
