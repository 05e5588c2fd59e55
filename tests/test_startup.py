"""Start-up: a model load shows a progress bar on a terminal's stderr (and nothing when stderr is a file or a
pipe), and the loaders give the same model as before while they build the tokenizer alongside the tensors."""

import io

import pytest


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("model", ["tiny", "default_model_path"])
def test_a_load_shows_progress_on_a_terminal_only(model, request, monkeypatch):
    from forge.loader import load_model

    path = request.getfixturevalue(model)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    loaded = load_model(path)
    shown = terminal.getvalue()
    assert f"Loading {loaded.path.name}" in shown and " tensors" in shown, shown[-300:]
    assert loaded.tokenizer.encode("Hello world") and loaded.weights

    piped = io.StringIO()  # not a terminal: no bar
    monkeypatch.setattr("sys.stderr", piped)
    load_model(path)
    assert piped.getvalue() == ""
