"""What ``import mobillama`` costs: the inference path stays torch-only, the HF classes load on first use.

Each check runs in a fresh interpreter, because the test process itself has transformers imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mobillama
from mobillama.checkpoint import save_checkpoint
from mobillama.config import get_preset
from mobillama.infer.quant_checkpoint import quantize_checkpoint

SRC = str(Path(mobillama.__file__).resolve().parents[1])


def run_python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout's sources; it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def checkpoints(tmp_path, seeded_model) -> tuple[Path, Path]:
    """A tiny full-precision checkpoint and its int8 quantized copy."""
    cfg = get_preset("micro")
    save_checkpoint(seeded_model(cfg), cfg, tmp_path / "ckpt")
    quantize_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt-int8", bits=8)
    return tmp_path / "ckpt", tmp_path / "ckpt-int8"


INFERENCE = """
import json, sys
loaded = {}
import mobillama
loaded["import"] = sorted(m for m in ("transformers", "torch._dynamo") if m in sys.modules)
from mobillama.checkpoint import load_model
from mobillama.infer.generator import Generator
from mobillama.infer.sampling import SamplingParams
from mobillama.infer.quant_checkpoint import load_quantized
model = load_model(sys.argv[1])
loaded["load_model"] = sorted(m for m in ("transformers", "torch._dynamo") if m in sys.modules)
params = SamplingParams(max_new_tokens=4, stop_at_eos=False)
[c] = Generator(model).generate_ids([[1, 5, 7]], params)
[qc] = Generator(load_quantized(sys.argv[2])).generate_ids([[1, 5, 7]], params)
loaded["generate"] = sorted(m for m in ("transformers", "torch._dynamo") if m in sys.modules)
print(json.dumps({"loaded": loaded, "tokens": [len(c.token_ids), len(qc.token_ids)]}))
"""


def test_import_load_generate_and_quantized_load_never_import_transformers(checkpoints):
    ckpt, q8 = checkpoints
    out = run_python(INFERENCE, str(ckpt), str(q8))
    assert out["tokens"] == [4, 4]  # the run really generated
    # torch._dynamo is what normal_() on a meta tensor pulls in (~70 MB); loading must not either
    assert out["loaded"] == {"import": [], "load_model": [], "generate": []}


LAZY_HF = """
import json, sys
import mobillama
before = "transformers" in sys.modules
cls = mobillama.MobiLlamaForCausalLM  # first touch imports mobillama.hf and registers the Auto classes
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"before": before, "after": "transformers" in sys.modules,
                  "is_cls": type(hf) is cls, "in_dir": "MobiLlamaConfig" in dir(mobillama)}))
"""

AUTO_AFTER_HF_IMPORT = """
import json, sys, torch
import mobillama.hf
from transformers import AutoConfig, AutoModelForCausalLM
from mobillama.checkpoint import load_model
ids = torch.load(sys.argv[2])
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    diff = (hf(ids).logits - load_model(sys.argv[1])(ids)).abs().max().item()
print(json.dumps({"config": type(AutoConfig.from_pretrained(sys.argv[1])).__name__,
                  "model": type(hf).__name__, "diff": diff}))
"""


def test_touching_an_hf_name_imports_transformers_and_registers_the_auto_classes(checkpoints):
    out = run_python(LAZY_HF, str(checkpoints[0]))
    assert out == {"before": False, "after": True, "is_cls": True, "in_dir": True}


def test_auto_classes_load_a_checkpoint_after_importing_mobillama_hf(checkpoints, tmp_path):
    ids = torch.randint(0, get_preset("micro").vocab_size, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    out = run_python(AUTO_AFTER_HF_IMPORT, str(checkpoints[0]), str(tmp_path / "ids.pt"))
    assert out == {"config": "MobiLlamaConfig", "model": "MobiLlamaForCausalLM", "diff": 0.0}


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        mobillama.no_such_name  # noqa: B018
    from mobillama import MobiLlamaConfig, MobiLlamaForCausalLM
    from mobillama.hf import MobiLlamaConfig as direct

    assert MobiLlamaConfig is direct and MobiLlamaForCausalLM.config_class is direct
