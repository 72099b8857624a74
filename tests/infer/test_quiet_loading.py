"""Loading a checkpoint's tokenizer prints nothing: ``make demo`` used to show transformers' "a model of type
`mobillama` to instantiate a model of type ``" warning twice, because AutoTokenizer read config.json before
model_type mobillama was registered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A fresh interpreter: in the test process mobillama.hf (the registration) is usually imported already.
LOADERS = {
    "infer": "from mobillama.infer.load import load_checkpoint_tokenizer as f; f(sys.argv[1])",
    "eval": "from mobillama.eval.harness import load_eval_tokenizer as f; f(sys.argv[1])",
}


@pytest.mark.parametrize("path", sorted(LOADERS))
def test_tokenizer_loading_prints_no_model_type_warning(tiny_checkpoint, path):
    code = f"import sys, logging\nlogging.basicConfig(level=logging.WARNING)\n{LOADERS[path]}\nprint('ok')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
    assert "to instantiate a model of type" not in result.stderr, result.stderr[-2000:]
