"""Log lines in a notebook: information on stdout, warnings and errors on stderr, in one format.

JupyterLab shows everything written to stderr as a red block, so the INFO lines of loading a model looked like
errors; and PaddlePaddle installs its own handler (its own format) on the root logger at import. In a
notebook, `notebook_logging()` replaces the root logger's handlers with two that share serving's format:

    from serving.notebook.logs import notebook_logging
    notebook_logging()          # INFO and DEBUG -> stdout (plain), WARNING and above -> stderr (red)
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # serving.web.server.configure_logging's


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def notebook_logging(level: str = "INFO") -> None:
    """Route the root logger: records below WARNING to stdout, the rest to stderr; `level` and up are shown."""
    try:  # PaddlePaddle adds its handler to the root logger when first imported: import it now, replace it below
        import paddle  # noqa: F401
    except ImportError:
        pass
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(_Below(logging.WARNING))
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (info, problems):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
