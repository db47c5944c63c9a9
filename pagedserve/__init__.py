"""pagedserve: LLM inference and serving built around PagedAttention."""
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    # Lazy, so that `import pagedserve` (and the KV cache core) never pulls in torch or transformers.
    if name == "LLM":
        from pagedserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedserve.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
