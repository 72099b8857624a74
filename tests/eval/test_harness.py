"""The mobillama lm-eval model against lm-eval's stock ``hf`` backend on the same checkpoint."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.instance import Instance

import mobillama.hf  # noqa: F401  (registers the HF classes the stock backend loads)
from mobillama.errors import MobiLlamaError
from mobillama.eval.harness import MobiLlamaLM

TOL = 1e-4


def _ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.fixture(scope="module")
def ours(checkpoint):
    return MobiLlamaLM(pretrained=str(checkpoint), batch_size=4)


@pytest.fixture(scope="module")
def stock(checkpoint):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def stock_nocache(checkpoint):
    """HFLM without its one-token logits cache. In lm-eval 0.4.13 that cache reuses one forward pass for
    requests whose context + continuation[:-1] tokens coincide, but gathers the *leading* positions of the
    longer continuation's logits for the shorter one: ("The quick brown", " fox") next to
    ("The qu", "ick brown fox") is scored 2e-3 off. Our split-independent scoring matches the exact value."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(checkpoint), batch_size=4, device="cpu", logits_cache=False)


BOUNDARY_PAIRS = [
    ("The quick brown", " fox"),  # one word, leading space
    ("The quick brown", "fox"),  # continuation starting mid-word (no space)
    ("The qu", "ick brown fox"),  # context ends mid-word
    ("A man is sitting ", "on a roof."),  # trailing context space moves to the continuation
    ("Question: What is the capital of France?\nAnswer:", " Paris is the capital of France."),  # multi-token
    ("Question: What is the capital of France?\nAnswer:", " Paris"),  # same context, different lengths
    ("", "hello there"),  # empty context: conditioned on BOS
    ("She picked up the guitar", " and started playing a song about the sea and the sky."),
]


def test_loglikelihood_matches_stock_hf_backend(ours, stock_nocache):
    reqs = _ll_requests(BOUNDARY_PAIRS)
    a, b = ours.loglikelihood(reqs, disable_tqdm=True), stock_nocache.loglikelihood(reqs, disable_tqdm=True)
    for pair, (la, ga), (lb, gb) in zip(BOUNDARY_PAIRS, a, b):
        assert la == pytest.approx(lb, abs=TOL), pair
        assert ga == gb, pair
        assert la < 0


def test_boundary_tokens_split_like_hflm(ours, stock):
    for context, continuation in BOUNDARY_PAIRS[:6]:
        assert ours._encode_pair(context, continuation) == stock._encode_pair(context, continuation)
    ctx, cont = ours._encode_pair("The quick brown", "fox")
    assert len(cont) >= 1 and ours.tok_decode(cont).strip().endswith("fox")


def test_long_context_left_truncated_like_hflm(short_checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = MobiLlamaLM(pretrained=str(short_checkpoint), batch_size=3)
    stock = HFLM(pretrained=str(short_checkpoint), batch_size=3, device="cpu")
    long_ctx = "The quick brown fox jumps over the lazy dog. " * 6  # far beyond 24 tokens
    pairs = [(long_ctx, " A man is sitting"), (long_ctx, " on a roof."), ("Short one", " here")]
    assert len(ours.tok_encode(long_ctx)) > ours.max_length
    reqs = _ll_requests(pairs)
    a, b = ours.loglikelihood(reqs, disable_tqdm=True), stock.loglikelihood(reqs, disable_tqdm=True)
    for (la, _), (lb, _) in zip(a, b):
        assert la == pytest.approx(lb, abs=TOL)
    # the kept window is the last max_length + 1 tokens of context + continuation
    ctx, cont = ours._encode_pair(long_ctx, " A man is sitting")
    kept = ctx[-(ours.max_length + 1 - len(cont)) :]
    assert len(kept) + len(cont) == ours.max_length + 1 < len(ctx) + len(cont)
    direct = ours._loglikelihood_tokens([(None, kept, cont)], disable_tqdm=True)[0][0]
    assert a[0][0] == pytest.approx(direct, abs=1e-6)


def test_empty_continuation_scores_zero(ours):
    out = ours._loglikelihood_tokens([(("x", ""), [1, 5, 6], [])], disable_tqdm=True)
    assert out == [(0.0, True)]


def test_continuation_longer_than_max_length_is_scored_in_windows(short_checkpoint):
    """A 30-token continuation on a 24-token model: chunks of 12, each conditioned on the tokens before it."""
    import torch
    import torch.nn.functional as F

    ours = MobiLlamaLM(pretrained=str(short_checkpoint), batch_size=2)
    context, continuation = [1, 5], [7 + (i % 11) for i in range(30)]
    (logp, greedy), short = ours._loglikelihood_tokens(
        [(("a", "b"), context, continuation), (("c", "d"), [1, 5], [7, 8])], disable_tqdm=True
    )
    full, limit, expected = context + continuation, ours.max_length, 0.0
    for start in range(len(context), len(full), limit // 2):
        piece = full[start : start + limit // 2]
        window = full[:start][-(limit + 1 - len(piece)) :] + piece
        with torch.no_grad():
            logits = ours.model(torch.tensor([window[:-1]]))[0].float()
        targets = torch.tensor(window[1:])[-len(piece) :]
        expected += float(F.log_softmax(logits[-len(piece) :], -1).gather(1, targets[:, None]).sum())
    assert logp == pytest.approx(expected, abs=1e-4) and logp < 0 and isinstance(greedy, bool)
    # the short request in the same batch is unaffected by its long neighbour
    assert short == ours._loglikelihood_tokens([(("c", "d"), [1, 5], [7, 8])], disable_tqdm=True)[0]


def test_batch_size_one_and_n_agree(checkpoint):
    reqs = _ll_requests(BOUNDARY_PAIRS)
    one = MobiLlamaLM(pretrained=str(checkpoint), batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    many = MobiLlamaLM(pretrained=str(checkpoint), batch_size=5).loglikelihood(reqs, disable_tqdm=True)
    for (la, ga), (lb, gb) in zip(one, many):
        assert la == pytest.approx(lb, abs=TOL) and ga == gb


def test_rolling_matches_stock_hf_backend(short_checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = MobiLlamaLM(pretrained=str(short_checkpoint), batch_size=2)
    stock = HFLM(pretrained=str(short_checkpoint), batch_size=2, device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Short text."]  # one spans several windows
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    a = ours.loglikelihood_rolling(reqs, disable_tqdm=True)
    b = stock.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert a == pytest.approx(b, abs=TOL)


def test_generate_until_matches_stock_greedy(ours, stock):
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    reqs = [
        Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(["The quick", "A man is"])
    ]
    a = ours.generate_until(reqs, disable_tqdm=True)
    b = stock.generate_until(reqs, disable_tqdm=True)
    assert a == b
    assert all("\n" not in x for x in a)


def _local_mc_task(tmp_path):
    rows = [
        {
            "question": "The quick brown",
            "choices": [" fox", " dog", "fox jumps", " cat sat on the mat"],
            "label": 0,
        },
        {
            "question": "Question: What is the capital of France?\nAnswer:",
            "choices": [" Paris", " London is big"],
            "label": 0,
        },
        {"question": "She picked up the gui", "choices": ["tar", "de", "lty party"], "label": 0},
        {
            "question": "A man is sitting on a",
            "choices": [" roof.", " horse", " chair by the sea"],
            "label": 2,
        },
    ]
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    )
    return tmp_path


def test_local_task_same_per_sample_loglikelihoods_and_accuracy(ours, stock, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(_local_mc_task(tmp_path)), include_defaults=False)
    runs = [
        lm_eval.simple_evaluate(
            model=m, tasks=["tiny_mc"], task_manager=manager, log_samples=True, bootstrap_iters=0
        )  # fmt: skip
        for m in (ours, stock)
    ]
    samples = [sorted(r["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for r in runs]
    assert len(samples[0]) == 4
    for sa, sb in zip(*samples):
        lls_a = [resp[0][0] for resp in sa["resps"]]
        lls_b = [resp[0][0] for resp in sb["resps"]]
        assert lls_a == pytest.approx(lls_b, abs=TOL)
        assert sa["acc"] == sb["acc"] and sa["acc_norm"] == sb["acc_norm"]
    for metric in ("acc,none", "acc_norm,none"):
        assert runs[0]["results"]["tiny_mc"][metric] == runs[1]["results"]["tiny_mc"][metric]


def test_registered_with_lm_eval(checkpoint):
    from lm_eval.api.registry import get_model

    assert get_model("mobillama") is MobiLlamaLM
    lm = MobiLlamaLM.create_from_arg_string(f"pretrained={checkpoint},batch_size=3")
    assert lm.batch_size == 3 and lm.max_length == 256


def test_bad_model_args(checkpoint, tmp_path):
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        MobiLlamaLM(pretrained=str(tmp_path / "nope"))
    with pytest.raises(MobiLlamaError, match="batch_size"):
        MobiLlamaLM(pretrained=str(checkpoint), batch_size="zero")
    with pytest.raises(MobiLlamaError, match="dtype"):
        MobiLlamaLM(pretrained=str(checkpoint), dtype="int3")
    (tmp_path / "notok").mkdir()
    with pytest.raises(MobiLlamaError, match="no tokenizer files"):
        MobiLlamaLM(pretrained=str(tmp_path / "notok"))


def test_shared_prefix_cache_equals_gathered_concatenation():
    import torch

    from mobillama.eval.harness import SharedPrefixCache
    from mobillama.model import KVCache

    prefix = KVCache()
    k, v = torch.randn(3, 5, 2, 4).transpose(1, 2), torch.randn(3, 5, 2, 4).transpose(1, 2)  # strided views
    prefix.update(k, v, 0)
    rows = [2, 2, 0, 1, 2, 0]  # runs broken up, as after sorting by continuation length
    cache = SharedPrefixCache(prefix, rows)
    new_k, new_v = torch.randn(6, 2, 3, 4), torch.randn(6, 2, 3, 4)
    jk, jv = cache.update(new_k, new_v, 0)
    idx = torch.tensor(rows)
    assert torch.equal(jk, torch.cat([k[idx], new_k], dim=2))
    assert torch.equal(jv, torch.cat([v[idx], new_v], dim=2))
    assert cache.get_seq_length() == 5 and len(cache.spans) == 5


def test_bos_follows_the_tokenizers_convention(ours, smol_checkpoint):
    """Contexts get BOS where the tokenizer adds it (the Llama-style fixture: <s>) and not for a
    SmolLM2-style tokenizer (add_bos_token false); ``add_bos_token`` overrides either way."""
    assert ours.add_bos_token and ours.tok_encode("The quick")[0] == 1
    smol = MobiLlamaLM(pretrained=str(smol_checkpoint), batch_size=2)
    plain = smol.tokenizer.encode("hello world", add_special_tokens=False)
    assert not smol.add_bos_token and smol.tok_encode("hello world") == plain
    assert smol.tok_encode("<|im_start|>user\nhi")[0] == 1 and smol.tok_encode("<|im_start|>user\nhi")[1] != 1
    forced = MobiLlamaLM(pretrained=str(smol_checkpoint), batch_size=2, add_bos_token=True)
    assert forced.tok_encode("hello world") == [1, *plain]
