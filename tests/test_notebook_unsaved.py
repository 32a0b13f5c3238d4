"""Notebook 04's export refuses edits of `#| export` cells that ran but were not saved (issue 19)."""

from __future__ import annotations

import os
import time

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from serving.notebook.unsaved import unsaved, watch


def saved_notebook(path, source):
    nbformat.write(new_notebook(cells=[new_code_cell("x = 0", id="plain"), new_code_cell(source, id="api")]), str(path))
    past = time.time() - 60  # saved a minute ago
    os.utime(path, (past, past))
    return path


def test_an_export_cell_run_with_unsaved_edits_is_named(tmp_path):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    runs = watch(shell)
    assert watch(shell) is runs  # one watch per kernel
    notebook = saved_notebook(tmp_path / "04.ipynb", "#| export\ndef main():\n    return 1")

    shell.run_cell("#| export\ndef main():\n    return 1\n")  # as saved (trailing whitespace aside)
    shell.run_cell("y = 2")  # not an export cell
    assert unsaved(notebook, runs) == []

    shell.run_cell("#| export\ndef main():\n    return 2")  # edited and run, not saved
    assert unsaved(notebook, runs) == ["def main():"]

    saved_notebook(notebook, "#| export\ndef main():\n    return 2")
    os.utime(notebook, None)  # saved now, after both runs
    assert unsaved(notebook, runs) == []


def test_notebook_04_watches_its_export_cells_and_checks_before_exporting():
    from pathlib import Path

    nb = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "04_serve_api.ipynb", as_version=4)
    cells = {c.id: c.source for c in nb.cells}
    assert "export_runs = watch()" in cells["setup"]
    export = cells["export"]
    assert export.index("unsaved(") < export.index("export()")  # refuses before writing api.py
    assert "AISTUDIO_TOKEN" in cells["deploy-call"] and "api_serving/8080" in cells["deploy-title"]
