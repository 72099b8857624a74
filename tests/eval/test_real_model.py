"""The evaluation harness on the real SmolLM2-135M-Instruct agrees with lm-eval's stock ``hf`` backend.

On the real model the tokenizer's conventions matter: SmolLM2 adds no BOS, so a harness that prepends one
(or splits context and continuation differently) scores every sample differently from the stock backend.
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

import mobillama.hf  # noqa: F401  (registers the HF classes the stock backend loads)
from mobillama.eval.harness import MobiLlamaLM

PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("The quick brown", " fox jumps over the lazy dog."),
    ("In 1984, the population was 12345", " and growing."),
    ("def add(a, b):\n    return", " a + b"),
    ("She picked up the guitar", " and started playing."),
]


@pytest.fixture(scope="module")
def both(real_model):
    from lm_eval.models.huggingface import HFLM

    ours = MobiLlamaLM(pretrained=str(real_model[1]), batch_size=4)
    stock = HFLM(pretrained=str(real_model[1]), batch_size=4, device="cpu", logits_cache=False)
    return ours, stock


def test_per_sample_loglikelihoods_equal_the_stock_backend(both):
    ours, stock = both
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    a = ours.loglikelihood(reqs, disable_tqdm=True)
    b = stock.loglikelihood(reqs, disable_tqdm=True)
    for pair, (la, ga), (lb, gb) in zip(PAIRS, a, b):
        assert la == pytest.approx(lb, abs=2e-3), pair
        assert ga == gb, pair
    assert a[0][0] > a[1][0] + 2  # the model knows Paris, not Berlin, is the capital
    for context, continuation in PAIRS:
        assert ours._encode_pair(context, continuation) == stock._encode_pair(context, continuation)
        assert ours._encode_pair(context, continuation)[0][0] != 1  # no <|im_start|> (BOS) in front
