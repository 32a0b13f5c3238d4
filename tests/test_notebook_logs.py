"""In a notebook, information goes to stdout (plain) and only warnings and errors to stderr (red) (issue 19)."""

from __future__ import annotations

import logging
import warnings

from serving.notebook.logs import notebook_logging


def test_info_to_stdout_warnings_to_stderr_in_one_format(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        notebook_logging("INFO")
        assert len(root.handlers) == 2  # Paddle's own handler (another format) replaced
        log = logging.getLogger("serving.model.loader")
        log.info("model ready in 0.4 s")
        log.warning("serving the DEMO model")
        log.debug("not shown at INFO")
        out, err = capsys.readouterr()
        assert "INFO serving.model.loader: model ready in 0.4 s" in out and "DEMO" not in out
        assert "WARNING serving.model.loader: serving the DEMO model" in err and "model ready" not in err
        assert "not shown" not in out + err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_paddles_tensor_copy_warning_is_silenced_by_its_text():
    import serving  # noqa: F401  (serving.quiet runs at import)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        import serving.quiet as quiet

        quiet.silence_library_noise()
        warnings.warn("To copy construct from a tensor, it is recommended to use sourceTensor.clone().detach(), "
                      "rather than paddle.to_tensor(sourceTensor).", UserWarning)
        warnings.warn("a warning of our own", UserWarning)
    assert [str(w.message) for w in seen] == ["a warning of our own"]
