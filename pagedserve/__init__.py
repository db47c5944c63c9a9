"""pagedserve: LLM inference and serving built around PagedAttention."""
import os

# torch's OpenMP (libgomp) workers spin up to 300,000 rounds at every barrier before sleeping: when
# another process holds a core, a decode step gets about 10x slower. A spin of 1,000 rounds keeps the
# idle-machine speed and loses 2-3x then (docs/PERFORMANCE.md). It must be set before torch
# is imported; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "__version__"]


def __getattr__(name):
    # Lazy, so that `import pagedserve` (and the KV cache core) never pulls in torch or transformers.
    if name == "LLM":
        from pagedserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedserve.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)
