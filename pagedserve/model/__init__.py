"""The LLaMA-family model and its loaders (HF folder, GGUF file, the default model)."""
from pagedserve.model.config import ModelConfig
from pagedserve.model.llama import LlamaForCausalLM
from pagedserve.model.loader import LoadedModel, default_model_path, load_model, load_tokenizer, resolve_dtype

__all__ = ["LlamaForCausalLM", "LoadedModel", "ModelConfig", "default_model_path", "load_model",
           "load_tokenizer", "resolve_dtype"]
