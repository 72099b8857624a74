"""``python -m mobillama.eval run --model mobillama --model_args pretrained=CKPT ...``: lm-eval's own CLI
with the ``mobillama`` model type registered (lm-eval has no plugin discovery for model types), and the
HF classes registered with transformers' Auto classes so ``--model hf`` loads a mobillama checkpoint too."""

from lm_eval.__main__ import cli_evaluate

import mobillama.eval.harness  # noqa: F401  (registers the model)
import mobillama.hf  # noqa: F401  (registers model_type "mobillama" for --model hf)

cli_evaluate()
