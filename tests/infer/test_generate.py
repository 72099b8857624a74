"""Generation: the fast path against the reference forward, sampling, stop strings, streaming, bad input."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fixtures import llama3_scaling
from mobillama import kernels
from mobillama.errors import MobiLlamaError
from mobillama.infer.decoder import FastDecoder
from mobillama.infer.generator import Generator, drain, reference_greedy
from mobillama.infer.load import load_checkpoint_tokenizer
from mobillama.infer.sampling import (
    MOBILLAMA_CHAT_SYSTEM,
    SamplingParams,
    apply_repetition_penalty,
    sample_next,
)
from mobillama.model import MobiLlama
from mobillama.tokenizer import render_chat

GREEDY = SamplingParams(max_new_tokens=24, stop_at_eos=False)
# The fast decoder's bf16 logits against the bf16 forward, relative to the largest logit, on a
# realistic-scale model and a 56-token prompt: measured <= 0.026 over 8 steps; a 10% error in the fast
# path's rotary base gives 0.04-0.07 (fails by the second step).
BF16_FAST_PATH = 0.05


@pytest.mark.parametrize("sharing", ["all", "group:2", "none", "dedicated:1+all"])
def test_fast_greedy_equals_reference_argmax(byte_model, sharing):
    model = byte_model(ffn_sharing=sharing)
    prompt = list(range(10, 31))
    out = Generator(model).generate_ids([prompt], GREEDY)[0]
    assert out.token_ids == reference_greedy(model, prompt, 24)
    assert (out.finish_reason, out.prompt_tokens, out.completion_tokens) == ("length", 21, 24)


def test_batched_left_padded_greedy_equals_each_prompt_alone(byte_model):
    model = byte_model()
    prompts = [list(range(40, 45)), list(range(60, 80)), list(range(5, 17))]
    outs = Generator(model).generate_ids(prompts, SamplingParams(max_new_tokens=12, stop_at_eos=False))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(model, prompt, 12)


def test_prompt_embeddings_generate_as_their_token_ids(byte_model, byte_tokenizer):
    """iter_embeds (how MobiLlama-V prompts enter) runs the same loop as iter_ids: the embeddings of a
    left-padded batch of token prompts give the same completions, repetition penalty and stop strings
    included, and the same streamed deltas."""
    model = byte_model(seed=3)
    gen = Generator(model, byte_tokenizer)
    prompts = [byte_tokenizer.encode("def f(x):"), byte_tokenizer.encode("import")]
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.3, stop=("e",), stop_at_eos=False)
    by_ids: list[tuple[int, str]] = []
    want = drain(gen.iter_ids(prompts, params), lambda *event: by_ids.append(event))
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.inference_mode():
        embeds = model.model.embed_tokens(padded)
    by_embeds: list[tuple[int, str]] = []
    got = drain(
        gen.iter_embeds(embeds, [len(p) for p in prompts], params, seen_ids=prompts),
        lambda *event: by_embeds.append(event),
    )
    assert [c.__dict__ for c in got] == [c.__dict__ for c in want]
    assert by_embeds == by_ids
    with pytest.raises(MobiLlamaError, match="do not match"):
        drain(gen.iter_embeds(embeds, [3, 3], params))


@pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_kernels_give_the_logits_of_the_pytorch_path(byte_model, dtype):
    model = byte_model().to(dtype)
    fused, plain = FastDecoder(model), FastDecoder(model)
    plain.fused_attention = plain.fused_elementwise = False
    assert fused.fused_attention and fused.fused_elementwise == (dtype == torch.float32)
    torch.testing.assert_close(greedy_steps(fused, 8), greedy_steps(plain, 8), rtol=1e-4, atol=1e-4)


def greedy_steps(decoder: FastDecoder, steps: int) -> torch.Tensor:
    """Logits of a left-padded batch of two: the prefill, then ``steps`` greedy decode steps."""
    prompts = torch.tensor([[0, 0, 0] + list(range(40, 45)), list(range(60, 68))])  # row 0 left-padded
    decoder.start([3, 0], 20)
    logits = [decoder.prefill(prompts)]
    token = logits[0].argmax(-1)
    for slot in range(8, 8 + steps):
        logits.append(decoder.decode(token, slot))
        token = logits[-1].argmax(-1)
    return torch.stack(logits)


@pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels: {kernels.unavailable_reason()}")
@pytest.mark.parametrize(
    ("bits", "sharing", "norm_dtype"), [(4, "all", torch.float32), (8, "none", torch.bfloat16)]
)
def test_the_one_call_decode_step_equals_the_python_layer_loop_exactly(byte_model, bits, sharing, norm_dtype):
    """Same kernels in the same order: the C loop over the layers must give identical logits, with a
    left-padded batch, a bf16 cache, and steps that grow the attended length."""
    from mobillama.infer.quant import quantize_model

    model = quantize_model(byte_model(ffn_sharing=sharing), bits, 32 if bits == 4 else None)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = norm.weight.data.to(norm_dtype)
    one_call, loop = FastDecoder(model), FastDecoder(model)
    loop.one_call_layers = None
    assert one_call.one_call_layers is not None and one_call.cache_dtype == torch.bfloat16
    assert torch.equal(greedy_steps(one_call, 10), greedy_steps(loop, 10))
    assert one_call._layer_array is not None and loop._layer_array is None
    assert torch.equal(one_call.cache.keys[1], loop.cache.keys[1])


def test_the_one_call_step_is_not_used_where_a_layer_runs_elsewhere(byte_model):
    from mobillama.infer.quant import quantize_model

    assert FastDecoder(byte_model()).one_call_layers is None  # bf16/fp32 weights: PyTorch's matmuls
    model = quantize_model(byte_model(), 4, 32, int4_kernel="reference")
    assert FastDecoder(model).one_call_layers is None


def test_bf16_fast_path_logits_track_the_bf16_reference(byte_model, realistic_model, rel_err):
    model = realistic_model(byte_model().config).to(torch.bfloat16)  # max |logit| ~14
    prompt = list(range(10, 66))  # long enough that a rotary phase error grows
    decoder = FastDecoder(model)
    decoder.start([0], 80)
    logits = decoder.prefill(torch.tensor([prompt]))
    ids = torch.tensor([prompt])
    for step in range(8):
        with torch.inference_mode():
            ref = model(ids)[0, -1].float()
        print(f"step {step}: relative error {rel_err(logits[0], ref):.4f}")
        assert rel_err(logits[0], ref) < BF16_FAST_PATH
        nxt = int(ref.argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        logits = decoder.decode(torch.tensor([nxt]), len(prompt) + step)


def test_cache_is_reused_across_requests_and_results_do_not_leak(byte_model):
    model = byte_model()
    gen = Generator(model)
    first = gen.generate_ids([[5, 6, 7, 8]], GREEDY)[0].token_ids
    gen.generate_ids([list(range(100, 140))], GREEDY)
    assert gen.generate_ids([[5, 6, 7, 8]], GREEDY)[0].token_ids == first


def test_seeded_sampling_is_reproducible(byte_model):
    gen = Generator(byte_model())
    params = SamplingParams(
        max_new_tokens=30, temperature=1.5, top_k=50, top_p=0.95, seed=123, stop_at_eos=False
    )
    a = gen.generate_ids([[9, 10, 11]], params)[0].token_ids
    b = gen.generate_ids([[9, 10, 11]], params)[0].token_ids
    c = gen.generate_ids([[9, 10, 11]], SamplingParams(**{**params.__dict__, "seed": 124}))[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(byte_model):
    model = byte_model()
    gen = Generator(model)
    greedy = gen.generate_ids([[20, 21, 22]], GREEDY)[0].token_ids
    for params in (
        SamplingParams(max_new_tokens=24, temperature=1.0, top_k=1, seed=1, stop_at_eos=False),
        SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=1, stop_at_eos=False),
    ):
        assert gen.generate_ids([[20, 21, 22]], params)[0].token_ids == greedy


def test_top_k_and_top_p_only_draw_from_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    assert set(drawn.tolist()) == {0, 1}
    # softmax mass: 0.64, 0.23, 0.09, ... -> top_p 0.8 keeps exactly the first two
    drawn = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), gen)
    assert set(drawn.tolist()) == {0, 1}


def test_repetition_penalty_matches_the_ctrl_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_strong_repetition_penalty_prevents_repeats(byte_model):
    gen = Generator(byte_model())
    plain = gen.generate_ids([[30, 31]], SamplingParams(max_new_tokens=40, stop_at_eos=False))[0].token_ids
    assert len(set(plain)) < len(plain)  # an untrained model loops
    params = SamplingParams(max_new_tokens=40, repetition_penalty=1e6, stop_at_eos=False)
    out = gen.generate_ids([[30, 31]], params)[0].token_ids
    assert len(set(out)) == len(out) and not {30, 31} & set(out)


def test_stop_string_spanning_tokens_truncates_and_streams_nothing_past_it(byte_model, byte_tokenizer):
    gen = Generator(byte_model(ascii_only=True), byte_tokenizer)
    full = gen.generate(["hello"], SamplingParams(max_new_tokens=30, stop_at_eos=False))[0]
    # A three-character window of the greedy text (three bytes: three tokens), not at the start.
    stop = full.text[5:8]
    deltas: list[str] = []
    out = gen.generate(
        ["hello"],
        SamplingParams(max_new_tokens=30, stop=(stop,), stop_at_eos=False),
        on_text=lambda r, d: deltas.append(d),
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert "".join(deltas) == out.text
    assert out.completion_tokens < 30


def test_stream_yields_deltas_that_join_to_the_completion(byte_model, byte_tokenizer):
    gen = Generator(byte_model(), byte_tokenizer)
    params = SamplingParams(max_new_tokens=25, stop_at_eos=False)
    deltas = list(gen.stream("héllo wörld", params))
    assert len(deltas) > 1
    assert "".join(deltas) == gen.generate("héllo wörld", params)[0].text


def test_incomplete_utf8_is_held_back_until_complete(byte_tokenizer):
    from mobillama.infer.sampling import held_back

    partial = byte_tokenizer.decode(byte_tokenizer.encode("aé")[:-1])
    assert partial.endswith("\ufffd") and held_back(partial, ()) == 1
    assert held_back("abc ##", ("### Human:",)) == 2


def test_eos_stops_and_counts_as_a_generated_token(byte_model, byte_tokenizer):
    model = byte_model()
    greedy = Generator(model).generate_ids([[40, 41]], GREEDY)[0].token_ids
    byte_tokenizer.eos_id = greedy[3]
    out = Generator(model, byte_tokenizer).generate_ids([[40, 41]], SamplingParams(max_new_tokens=24))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy[:3] and out.completion_tokens == 4


def test_max_new_tokens_and_context_limit(byte_model):
    model = byte_model(max_position_embeddings=32)
    gen = Generator(model)
    out = gen.generate_ids([[5] * 10], SamplingParams(max_new_tokens=7, stop_at_eos=False))[0]
    assert (len(out.token_ids), out.finish_reason) == (7, "length")
    out = gen.generate_ids([[5] * 28], SamplingParams(max_new_tokens=50, stop_at_eos=False))[0]
    assert (len(out.token_ids), out.finish_reason) == (4, "length")  # clipped to the context


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": "x"}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"temperature": True}, "temperature"),
    ],
)
def test_invalid_sampling_values_are_rejected(kwargs, message):
    with pytest.raises(MobiLlamaError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected(byte_model, byte_tokenizer):
    model = byte_model(max_position_embeddings=32)
    gen = Generator(model, byte_tokenizer)
    with pytest.raises(MobiLlamaError, match="prompt 0 is empty"):
        gen.generate("")
    with pytest.raises(MobiLlamaError, match="prompt 1 is empty"):
        gen.generate_ids([[5], []], GREEDY)
    with pytest.raises(MobiLlamaError, match="context is 32"):
        gen.generate("x" * 40)
    with pytest.raises(MobiLlamaError, match="no prompts"):
        gen.generate([])
    with pytest.raises(MobiLlamaError, match="must be a string"):
        gen.generate([b"bytes"])
    with pytest.raises(MobiLlamaError, match="outside the vocabulary"):
        gen.generate_ids([[5, 9999]], GREEDY)
    with pytest.raises(MobiLlamaError, match="no tokenizer"):
        Generator(model).generate("hi")


def test_chat_template_renders_the_reference_string_exactly():
    reference = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n### Human: {message}\n### Assistant:"
    )
    assert render_chat([{"role": "user", "content": "Hi there"}]) == reference.format(message="Hi there")
    multi = render_chat(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    )
    assert (
        multi == f"{MOBILLAMA_CHAT_SYSTEM}\n### Human: a\n### Assistant: b</s>\n### Human: c\n### Assistant:"
    )
    assert render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]) == (
        "S\n### Human: u\n### Assistant:"
    )
    with pytest.raises(MobiLlamaError, match="role"):
        render_chat([{"role": "tool", "content": "x"}])


def test_checkpoint_tokenizer_round_trip_and_chat_default(tokenizer_dir, tmp_path):
    tok = load_checkpoint_tokenizer(tokenizer_dir)
    text = "def f(x):\n    return x  # ünïcode"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert tok.decode(ids[1:-1]) == text
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]).endswith(
        "### Human: q\n### Assistant:"
    )
    with pytest.raises(MobiLlamaError, match="no tokenizer files"):
        load_checkpoint_tokenizer(tmp_path)
    assert tok.add_bos and tok.stop_ids == (2,) and tok.encode_prompt("x")[0] == 1


def test_generate_text_with_a_real_tokenizer_checkpoint(tiny_checkpoint):
    from mobillama.infer.load import load_for_inference

    model = load_for_inference(tiny_checkpoint, dtype="fp32")
    gen = Generator(model, load_checkpoint_tokenizer(tiny_checkpoint))
    outs = gen.generate(["def main():", "import os"], SamplingParams(max_new_tokens=6, stop_at_eos=False))
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert all(o.completion_tokens == 6 and isinstance(o.text, str) for o in outs)
    assert isinstance(model, MobiLlama)


def test_embedding_rows_are_read_from_the_checkpoint_file(tiny_checkpoint, tmp_path):
    from mobillama.checkpoint import load_model, safetensors_location
    from mobillama.infer.load import FileRowEmbedding, load_for_inference

    model = load_for_inference(tiny_checkpoint, dtype="fp32")
    assert isinstance(model.model.embed_tokens, FileRowEmbedding)
    reference = load_model(tiny_checkpoint, dtype=torch.float32)
    table = reference.model.embed_tokens.weight
    embed = model.model.embed_tokens
    assert embed.weight.shape == table.shape and embed.weight.dtype == table.dtype
    assert embed.weight.untyped_storage().nbytes() <= 8  # a stand-in: nothing keeps the file mapped
    ids = torch.tensor([[5, 0, 5, table.shape[0] - 1], [7, 7, 1, 2]])
    assert torch.equal(embed(ids), table[ids])
    assert embed(torch.zeros(0, dtype=torch.long)).shape == (0, table.shape[1])
    for bad in (-1, table.shape[0]):
        with pytest.raises(IndexError, match="out of range"):
            embed(torch.tensor([bad]))
    with pytest.raises(MobiLlamaError, match="cannot be saved|to save it"):
        model.state_dict()
    out = Generator(model).generate_ids([[5, 6, 7]], SamplingParams(max_new_tokens=6, stop_at_eos=False))
    assert out[0].token_ids == reference_greedy(reference, [5, 6, 7], 6)
    # a dtype other than the stored one keeps the table in memory (converted), as before
    assert not isinstance(
        load_for_inference(tiny_checkpoint, dtype="bf16").model.embed_tokens, FileRowEmbedding
    )
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    truncated = load_for_inference(copy, dtype="fp32")
    os.truncate(copy / "model.safetensors", embed.offset + 3 * embed.row_bytes)  # rows 0-2 survive
    assert torch.equal(truncated.model.embed_tokens(torch.tensor([2])), table[[2]])
    with pytest.raises(MobiLlamaError, match="past the end"):
        truncated.model.embed_tokens(torch.tensor([9]))
    assert safetensors_location(tmp_path / "missing.safetensors", "x") is None
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert safetensors_location(garbage, "model.embed_tokens.weight") is None


def test_fast_decoder_applies_rope_scaling(byte_model, realistic_model, rel_err):
    """The fast path builds its own cos/sin tables: with Llama 3 scaling they must be the forward's."""
    scaling = llama3_scaling(16)
    model = realistic_model(byte_model(rope_scaling=scaling).config)
    prompt = list(range(10, 50))
    decoder = FastDecoder(model)
    decoder.start([0], 48)
    logits = decoder.prefill(torch.tensor([prompt]))
    ids = torch.tensor([prompt])
    for step in range(4):
        with torch.inference_mode():
            ref = model(ids)[0, -1].float()
        assert rel_err(logits[0], ref) < 1e-4, step
        nxt = int(ref.argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        logits = decoder.decode(torch.tensor([nxt]), len(prompt) + step)
