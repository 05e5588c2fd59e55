"""Errors a user can act on. Each carries a one-line message; the CLI and server print only that."""


class ForgeError(Exception):
    """Base class for every error forge raises on purpose."""


class ModelLoadError(ForgeError):
    """The model file or directory is missing, truncated or unreadable."""


class UnsupportedModelError(ForgeError):
    """The model uses an architecture, quantization or tokenizer forge does not implement."""


class InvalidRequestError(ForgeError, ValueError):
    """A prompt or sampling parameter is invalid (empty prompt, negative max_tokens, ...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus requested tokens) does not fit the model's context."""
