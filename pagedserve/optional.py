"""Optional dependencies: the packages only some features need, imported when such a feature is first used.

The engine (`import pagedserve`, `LLM` on a Hugging Face folder, `generate`) needs torch, transformers,
tokenizers, safetensors, numpy and tqdm only. Structured output needs xgrammar; reading a .gguf file needs
transformers' own GGUF reader or else the gguf package; the server needs fastapi, uvicorn, prometheus_client
and pyjwt. Where one is missing, using the feature raises MissingDependency naming the package to install,
and nothing else is affected (a GPU machine without the server's packages runs the engine).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """A feature was used whose package is not installed; the message names the feature and the package."""


def require(module: str, feature: str, package: str | None = None) -> ModuleType:
    """`import module`, or raise MissingDependency saying that `feature` needs `package` (default: module)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = package or module
        raise MissingDependency(f"{feature} needs the {package!r} package, which is not installed "
                                f"(pip install {package}): {e}", name=module) from e
