"""The exported GGUF run by llama.cpp itself (through llama-cpp-python): same logits, same tokens.

llama-cpp-python is an optional extra (``peer``: it compiles llama.cpp from source, minutes of build on
this machine). CI installs it (``scripts/install_llama_cpp_python.sh``, a cached wheel), so these tests run
there; elsewhere the module skips, saying so, where it is not installed. The reader-level checks in
``test_to_gguf.py`` always run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.config import get_preset
from mobillama.convert import export_gguf, llama_config, read_gguf_weights
from mobillama.model import MobiLlama

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python not installed: bash scripts/install_llama_cpp_python.sh .venv/bin/python",
)


@pytest.fixture
def ckpt(tmp_path, rel):
    torch.manual_seed(0)
    config = get_preset("micro").replace(vocab_size=384, intermediate_size=128)
    model = MobiLlama(config)
    with torch.no_grad():  # random norms and a larger scale make any layout mistake visible in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(5.0)
    rel.make_tokenizer(tmp_path / "tok")
    save_checkpoint(model, config, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    return tmp_path / "ckpt"


@pytest.mark.parametrize(("gguf_type", "tol"), [("f16", 5e-3), ("q8_0", 5e-2), ("q4_0", 6e-2)])
def test_llama_cpp_logits_match(tmp_path, ckpt, gguf_type, tol):
    """llama.cpp's logits equal a stock transformers Llama holding the file's (dequantized) weights.

    This is what proves the tensor names, the q/k permutation and the metadata right: with a wrong
    permutation the logits differ by ~100% of their scale. The remaining difference is llama.cpp's own
    arithmetic (it rounds activations to f16 / 8-bit blocks for quantized matmuls).
    """
    from transformers import LlamaForCausalLM

    config, _ = load_checkpoint(ckpt)
    export_gguf(ckpt, tmp_path / "m.gguf", gguf_type=gguf_type)
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False
    )
    ids = [1, 17, 200, 5, 99, 300, 42, 7, 250, 3]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)

    reference = LlamaForCausalLM(llama_config(config, torch.float32)).eval()
    reference.load_state_dict(read_gguf_weights(tmp_path / "m.gguf"), strict=True)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(want).max()
    print(f"{gguf_type}: max abs diff {np.abs(got - want).max():.4g}, max |logit| {scale:.4g}")
    assert scale > 1.0
    assert np.abs(got - want).max() / scale < tol
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_llama_cpp_tokenizes_like_the_checkpoint_tokenizer(tmp_path, ckpt):
    from transformers import AutoTokenizer

    export_gguf(ckpt, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    for text in ["the shared feed forward network", "every layer of the model", "zebra ümlaut"]:
        assert llm.tokenize(text.encode(), add_bos=False) == hf.encode(text, add_special_tokens=False), text


def test_llama_cpp_runs_a_file_without_vocabulary(tmp_path):
    """No tokenizer in the checkpoint: the file still loads in llama.cpp and runs token ids."""
    torch.manual_seed(0)
    config = get_preset("micro")
    save_checkpoint(MobiLlama(config), config, tmp_path / "ckpt")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", gguf_type="q8_0")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=32, n_threads=1, verbose=False)
    llm.eval([1, 5, 9])
    assert np.isfinite(np.array(llm.scores[2])).all()
