#!/usr/bin/env python3
"""Execute the notebooks headless with papermill, on the demo model, into an output folder.

    python tests/run_notebooks.py                         # every notebooks/*.ipynb, sorted
    python tests/run_notebooks.py notebooks/02_load_model.ipynb --output-dir artifacts/notebooks
    python tests/run_notebooks.py -p MAX_TOKENS 8 --timeout 300

The committed notebooks are never written: executed copies go to --output-dir (default: a new
temporary folder, printed at the end). Each notebook gets the parameters it declares in its
`parameters` cell, from these defaults overridden by -p: MODEL=demo (offline), EXPORT=False
(notebook 04 only checks that api.py is in sync instead of rewriting it). Kernels run in
notebooks/ with the repo on PYTHONPATH. Exit code 1 when any cell of any notebook fails.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
DEFAULTS = {"MODEL": "demo", "EXPORT": False}


def parse_value(text: str):
    """A Python literal when it is one (8, 0.5, True, None, "x"), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_one(notebook: Path, output_dir: Path, overrides: dict, timeout: int, kernel: str) -> tuple:
    """Execute one notebook; (ok, seconds, message)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    declared = pm.inspect_notebook(str(notebook))  # {name: {...}} from its `parameters` cell
    parameters = {k: v for k, v in overrides.items() if k in declared}
    output = output_dir / notebook.name
    print(f"\n=== {notebook.relative_to(ROOT)} -> {output}  parameters {parameters}", flush=True)
    started = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name=kernel, cwd=str(NOTEBOOKS),
            execution_timeout=timeout, start_timeout=120, progress_bar=False, log_output=True,
            request_save_on_cell_execute=True)
    except PapermillExecutionError as exc:
        return False, time.perf_counter() - started, f"cell {_cell_id(output, exc.cell_index)} raised {exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel died, cell timeout, unreadable notebook
        return False, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    return True, time.perf_counter() - started, "ok"


def _cell_id(executed: Path, index: int) -> str:
    """'<id>' of the cell at `index` of the executed copy (its indexes count the injected parameters cell)."""
    try:
        import nbformat

        return repr(nbformat.read(str(executed), as_version=4).cells[index].get("id"))
    except Exception:
        return f"#{index}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb, sorted")
    parser.add_argument("--output-dir", type=Path, help="where the executed copies go (default: a new temp folder)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter (a Python literal, else a string) in the notebooks that declare it")
    parser.add_argument("--timeout", type=int, default=900, help="seconds any one cell may take (default: %(default)s)")
    parser.add_argument("--kernel", default="python3", help="kernel name (default: %(default)s, ipykernel's own)")
    args = parser.parse_args(argv)

    notebooks = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not notebooks:
        print(f"no notebooks in {NOTEBOOKS}", file=sys.stderr)
        return 1
    output_dir = (args.output_dir or Path(tempfile.mkdtemp(prefix="notebooks-run-"))).resolve()
    if output_dir == NOTEBOOKS.resolve():
        print("--output-dir must not be notebooks/: the committed notebooks stay clean", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(DEFAULTS)
    overrides.update({name: parse_value(value) for name, value in args.parameter})

    # Kernels inherit this environment: the repo importable from notebooks/, no stray GUI backends.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("MPLBACKEND", "Agg")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs each cell's output

    results = []
    for notebook in notebooks:
        results.append((notebook, *run_one(notebook, output_dir, overrides, args.timeout, args.kernel)))

    print("\n=== summary")
    for notebook, ok, seconds, message in results:
        print(f"{'PASS' if ok else 'FAIL'}  {notebook.name:<28} {seconds:7.1f} s  {message}")
    total = sum(r[2] for r in results)
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)}/{len(results)} notebooks passed in {total:.1f} s; executed copies in {output_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
