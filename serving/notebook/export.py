"""Write api.py from the cells marked `#| export` in notebooks/04_serve_api.ipynb (nbdev style).

    python -m serving.notebook.export            # (re)write api.py
    python -m serving.notebook.export --check    # exit 1 and print a diff when api.py is out of date

Only code cells whose first line is `#| export` are exported, in notebook order; their leading
`#|` directive lines are dropped. The output depends on nothing but those cells' sources: line
endings are normalised, trailing whitespace stripped, cells are separated by two blank lines,
the file ends with exactly one newline, and the header names the notebook and the cells' ids
(which are fixed in the notebook's JSON). Exported cells must be plain Python: an IPython magic
(`%`, `%%`) or shell escape (`!cmd`) fails the export, naming the cell.

Exit codes: 0 done / in sync, 1 api.py differs (--check), 2 the notebook cannot be exported.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: serving/<subpackage>/this file
NOTEBOOK = ROOT / "notebooks" / "04_serve_api.ipynb"
TARGET = ROOT / "api.py"

_EXPORT = re.compile(r"^#\|\s*export\s*$")
_DIRECTIVE = re.compile(r"^#\|")
# `%magic`, `%%cell_magic`, `!cmd`, and IPython's `x = !cmd` / `x = %magic` assignments.
_IPYTHON_LINE = re.compile(r"^\s*(%%?[A-Za-z_]|!(?!=)|[\w.,\s\[\]()*]+=\s*(%[A-Za-z_]|!(?!=)))")


class ExportError(Exception):
    """The notebook cannot be exported; the message names the cell."""


@dataclass(frozen=True)
class ExportCell:
    id: str
    index: int  # position among all the notebook's cells
    code: str  # normalised source without the directive lines


def _label(path: Path) -> str:
    """The notebook's name as the header gives it: relative to the repo, with forward slashes."""
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def _normalise(source: str) -> list[str]:
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line.rstrip() for line in lines]


def is_export_cell(cell) -> bool:
    if cell.get("cell_type") != "code":
        return False
    first = _normalise(cell.get("source", ""))[0]
    return bool(_EXPORT.match(first.strip()))


def _check_python(code: str, where: str, first_line: int = 1) -> None:
    """Plain Python or ExportError; line numbers count from `first_line` (the cell's own numbering)."""
    for n, line in enumerate(code.split("\n"), first_line):
        if "get_ipython(" in line:
            raise ExportError(f"{where}, line {n}: uses get_ipython(), which plain Python does not have: "
                              f"{line.strip()!r}")
    try:
        ast.parse(code)
    except SyntaxError as exc:
        for n, line in enumerate(code.split("\n"), first_line):
            if _IPYTHON_LINE.match(line):
                raise ExportError(
                    f"{where}, line {n}: IPython magic or shell escape {line.strip()!r}; exported cells must be "
                    "plain Python (move it to a cell without '#| export', or use subprocess)") from None
        raise ExportError(f"{where}, line {(exc.lineno or 1) + first_line - 1}: not valid Python: {exc.msg}") from None


def require_stable_ids(nb, label: str = "notebook") -> None:
    """nbformat 4.5+ with an id on every cell: the ids the header names must come from the file."""
    if nb.get("nbformat") != 4 or nb.get("nbformat_minor", 0) < 5:
        raise ExportError(f"{label} is nbformat {nb.get('nbformat')}.{nb.get('nbformat_minor')}; save it as 4.5 "
                          "or newer so every cell has a stable id")
    for index, cell in enumerate(nb.cells):
        if not cell.get("id"):
            raise ExportError(f"{label}: cell {index} has no id; save the notebook with JupyterLab or nbformat 5 "
                              "so it gets one")


def export_cells(nb, label: str = "notebook") -> list[ExportCell]:
    """The `#| export` code cells of a notebook, checked and normalised."""
    require_stable_ids(nb, label)
    cells, seen = [], set()
    for index, cell in enumerate(nb.cells):
        if not is_export_cell(cell):
            continue
        cell_id = cell.get("id")
        where = f"{label}: exported cell {cell_id!r} (index {index})"
        if not cell_id:
            raise ExportError(f"{where} has no id")
        if cell_id in seen:
            raise ExportError(f"{where}: the id is not unique")
        seen.add(cell_id)
        lines = _normalise(cell.source)
        first_line = 1
        while lines and (_DIRECTIVE.match(lines[0]) or not lines[0]):
            lines.pop(0)
            first_line += 1
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            raise ExportError(f"{where} is empty")
        code = "\n".join(lines)
        _check_python(code, where, first_line)
        cells.append(ExportCell(cell_id, index, code))
    if not cells:
        raise ExportError(f"{label} has no code cell whose first line is '#| export'")
    return cells


def render(cells: list[ExportCell], label: str) -> str:
    header = (
        f"# AUTOGENERATED! DO NOT EDIT! File to edit: {label} (cells: {', '.join(c.id for c in cells)})\n"
        "# Edit the cells marked '#| export' there, then regenerate: python -m serving.notebook.export\n"
    )
    return header + "\n" + "\n\n\n".join(c.code for c in cells) + "\n"


def _exporter_class():
    from nbconvert.exporters import Exporter

    class ApiExporter(Exporter):
        """nbconvert exporter: a notebook's `#| export` code cells as one Python module."""

        output_mimetype = "text/x-python"

        def _file_extension_default(self):
            return ".py"

        def from_notebook_node(self, nb, resources=None, **kw):
            label = (resources or {}).get("qwenvl_label", "notebook")
            require_stable_ids(nb, label)
            nb_copy, resources = super().from_notebook_node(nb, resources, **kw)
            return render(export_cells(nb_copy, label), label), resources

    return ApiExporter


class _Node(dict):
    """A notebook's JSON with attribute access (nb.cells, cell.source), as nbformat's NotebookNode has."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _plain_notebook(data) -> _Node:
    """The notebook JSON read without nbformat: sources joined into one string, as nbformat's reader does."""
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError("not a notebook: no list of cells")
    cells = []
    for cell in data["cells"]:
        cell = _Node(cell)
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
        cells.append(cell)
    return _Node(data, cells=cells)


def export_text(notebook: Path = NOTEBOOK) -> str:
    """The text api.py should have: a fresh export of `notebook`. Uses nbformat and nbconvert when installed
    (build_env.sh --dev); the notebook's JSON directly otherwise (a deployment environment has neither), with
    the same result."""
    try:
        import nbformat
    except ImportError:
        nbformat = None
    notebook = Path(notebook)
    label = _label(notebook)
    try:
        text = notebook.read_text(encoding="utf-8")
        plain = _plain_notebook(json.loads(text))
        require_stable_ids(plain, label)  # the file's own ids: nbformat's reader fills in missing ones at random
        nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT) if nbformat is not None else plain
    except FileNotFoundError:
        raise ExportError(f"notebook not found: {notebook}") from None
    except ExportError:
        raise
    except Exception as exc:  # unreadable JSON, not a notebook
        raise ExportError(f"cannot read {label}: {type(exc).__name__}: {exc}") from None
    if nbformat is None:
        return render(export_cells(nb, label), label)
    text, _ = _exporter_class()().from_notebook_node(nb, resources={"qwenvl_label": label})
    return text


def write(notebook: Path = NOTEBOOK, target: Path = TARGET) -> bool:
    """Export `notebook` to `target`; True when the file changed."""
    data = export_text(notebook).encode("utf-8")
    target = Path(target)
    if target.is_file() and target.read_bytes() == data:
        return False
    target.write_bytes(data)  # bytes: no platform newline translation
    return True


def diff(notebook: Path = NOTEBOOK, target: Path = TARGET) -> str:
    """A unified diff from `target` to a fresh export; empty when they are byte-identical."""
    fresh = export_text(notebook).encode("utf-8")
    target = Path(target)
    current = target.read_bytes() if target.is_file() else b""
    if current == fresh:
        return ""
    name = _label(target)
    lines = difflib.unified_diff(
        current.decode("utf-8", "replace").splitlines(keepends=True),
        fresh.decode("utf-8").splitlines(keepends=True),
        fromfile=f"{name} (on disk)", tofile=f"{name} (fresh export of {_label(notebook)})")
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not target.is_file():
        text = f"{name} does not exist\n" + text
    elif current.replace(b"\r\n", b"\n") == fresh:
        text = f"{name} differs only in line endings (CRLF); the export writes LF\n" + text
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.notebook.export",
        description="Write api.py from the '#| export' cells of notebooks/04_serve_api.ipynb.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and print a diff when api.py differs from a fresh export")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK, help="source notebook (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=TARGET, help="file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    label, target = _label(args.notebook), _label(args.output)
    try:
        if args.check:
            text = diff(args.notebook, args.output)
            if text:
                sys.stdout.write(text)
                print(f"{target} is out of date with {label}: run python -m serving.notebook.export", file=sys.stderr)
                return 1
            print(f"{target} is in sync with {label}")
            return 0
        changed = write(args.notebook, args.output)
        print(f"{'wrote' if changed else 'unchanged:'} {target} from {label}")
        return 0
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
