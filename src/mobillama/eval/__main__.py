"""``python -m mobillama.eval run --model mobillama --model_args pretrained=CKPT ...``: lm-eval's own CLI
with the ``mobillama`` model type registered (lm-eval has no plugin discovery for model types)."""

from lm_eval.__main__ import cli_evaluate

import mobillama.eval.harness  # noqa: F401  (registers the model)

cli_evaluate()
