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


class RequestFailure(ForgeError):
    """Work done for particular requests failed: sampling with their parameters, their grammar's masks, the
    checks of their tokens. The engine fails exactly these requests and carries on with the others.

    `causes` maps each request id to what went wrong; an InvalidRequestError cause means the request's own
    input was at fault (a client error), anything else is an internal error."""

    def __init__(self, causes: dict[str, BaseException]):
        self.causes = dict(causes)
        first = next(iter(self.causes.values()), None)
        super().__init__(f"request(s) {', '.join(self.causes)} failed: {type(first).__name__}: {first}")

    @property
    def request_ids(self) -> list[str]:
        return list(self.causes)
