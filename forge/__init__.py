"""forge: a readable LLM inference engine for Llama-family models."""

from forge.outputs import CompletionOutput, RequestOutput
from forge.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Import LLM lazily so `import forge` stays cheap for the CLI's --help.
    if name == "LLM":
        from forge.llm import LLM

        return LLM
    raise AttributeError(name)
