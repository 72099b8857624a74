"""The lean runtime (no PyTorch in the process): the same numbers as the default runtime's decode step,
no torch imported, its kernel image cached and checked, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobillama import kernels
from mobillama.cli import main
from mobillama.errors import MobiLlamaError
from mobillama.infer import lean
from mobillama.infer.decoder import FastDecoder
from mobillama.infer.load import load_quantized, serve_embedding_from_file
from mobillama.infer.quant_checkpoint import quantize_checkpoint
from mobillama.kernels import clib

pytestmark = pytest.mark.skipif(
    kernels.matmul_isa() is None, reason=f"no CPU kernels: {kernels.matmul_unavailable_reason()}"
)
# The same tests on either build: the AVX-512 one (where this CPU has it) and the AVX2 one.
ISAS = [
    pytest.param("avx512", marks=pytest.mark.skipif(not kernels.available(), reason="no AVX-512 VNNI here")),
    "avx2",
]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64]


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch) -> Path:
    """Kernel images in this test's own directory (the child process inherits the variable); the built
    kernel library stays shared (linked in), so no child process compiles it again."""
    shared = kernels.build.cache_dir()
    shared.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("MOBILLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "lean"


def torch_decoder(ckpt: Path) -> FastDecoder:
    model = load_quantized(str(ckpt), dtype=torch.bfloat16, int8_kernel="auto", int4_kernel="auto")
    serve_embedding_from_file(model, str(ckpt))
    return FastDecoder(model)


def torch_steps(dec: FastDecoder, ids: list[int]) -> list[np.ndarray]:
    """The default runtime's logits after each of ``ids``, fed one token at a time."""
    dec.start([0], len(ids) + 4)
    out = [dec.prefill(torch.tensor([ids[:1]]))[0].numpy()]
    for slot, token in enumerate(ids[1:], start=1):
        out.append(dec.decode(torch.tensor([token]), slot)[0].numpy())
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("sharing", ["none", "all"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head", [True, False])
def test_lean_steps_equal_the_default_runtime_exactly(tied_quantized, monkeypatch, isa, sharing, bits, head):
    """On each build of the kernels (a CPU without AVX-512 runs the AVX2 one), the lean runtime computes
    the default runtime's numbers bit for bit: decode steps, and a prompt in one call."""
    monkeypatch.setenv(clib.ISA_ENV, isa)
    ckpt = tied_quantized(sharing, bits, head)
    model = lean.LeanModel.open(ckpt, quiet=True)
    assert model.isa == ("vnni" if isa == "avx512" else "avx2")
    assert model.head["kind"] == ("packed" if head else "bf16")
    model.start(len(PROMPT) + 4)
    steps = [model.decode(t) for t in PROMPT]
    for ours, theirs in zip(steps, torch_steps(torch_decoder(ckpt), PROMPT), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # the prompt in one call: projections over all rows at once, attention token by token: same numbers,
    # in both runtimes
    model.start(len(PROMPT) + 4)
    np.testing.assert_array_equal(model.prefill(PROMPT), steps[-1])
    dec = torch_decoder(ckpt)
    dec.start([0], len(PROMPT) + 4)
    np.testing.assert_array_equal(dec.prefill(torch.tensor([PROMPT]))[0].numpy(), steps[-1])


def test_an_untied_checkpoint_with_its_own_quantized_head(tmp_path, tokenizer_dir):
    from fixtures import save_micro_checkpoint

    src = save_micro_checkpoint(tmp_path / "untied", tokenizer_dir, intermediate_size=192, embed_scale=20)
    ckpt = tmp_path / "q"
    quantize_checkpoint(src, ckpt, 4, group_size=32)
    model = lean.LeanModel.open(ckpt, quiet=True)
    model.start(len(PROMPT))
    steps = [model.decode(t) for t in PROMPT]
    np.testing.assert_array_equal(steps[-1], torch_steps(torch_decoder(ckpt), PROMPT)[-1])
    assert model.greedy(PROMPT, 5) == model.greedy(PROMPT, 5)  # a second request starts clean


def test_argmax_takes_the_first_of_equal_logits_and_never_a_nan(tied_quantized):
    from array import array

    model = lean.LeanModel.open(tied_quantized("all", 8), quiet=True)
    assert model.argmax(array("f", [1.0, 3.0, 3.0, 2.0])) == 1
    assert model.argmax(array("f", [float("nan"), -5.0, float("nan"), -1.0])) == 3
    assert model.argmax(array("f", [float("-inf"), float("-inf")])) == 0
    assert model.argmax(array("f", np.float32([0.5, 7.0]).tobytes())) == int(np.argmax([0.5, 7.0]))


SAMPLING_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.5, top_k=8, top_p=0.6),
    dict(temperature=2.0, top_k=1),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampling_draws_from_the_default_runtimes_distribution(tied_quantized, case):
    """``mb_sample`` over an even grid of draws u: each token's share of the grid equals the probability the
    default runtime's ``sample_next`` gives it (same temperature, top-k and top-p rules), to the grid step."""
    from array import array

    from fixtures import sampling_distribution
    from mobillama.infer.sampling import SamplingParams

    model = lean.LeanModel.open(tied_quantized("all", 8), quiet=True)
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 3
    logits[7] = logits[8] = logits.max() + 0.5  # a tie at the top
    logits[11] = float("-inf")
    params = SamplingParams(**case)
    expected = sampling_distribution(logits, params).numpy()
    grid = 4000
    counts = np.zeros(len(logits))
    for i in range(grid):
        draw = type("Fixed", (), {"random": staticmethod(lambda i=i: (i + 0.5) / grid)})()
        counts[model.sample(array("f", logits.numpy().tobytes()), params, draw)] += 1
    np.testing.assert_allclose(counts / grid, expected, atol=2 / grid)
    assert counts[11] == 0


def test_sampling_edge_cases(tied_quantized):
    from array import array

    from mobillama.infer.sampling import SamplingParams

    model = lean.LeanModel.open(tied_quantized("all", 8), quiet=True)
    fixed = type("Fixed", (), {"random": staticmethod(lambda: 0.999)})()
    nan = float("nan")
    assert model.sample(array("f", [0.0, nan, 5.0, nan]), SamplingParams(temperature=1.0), fixed) == 2
    assert model.sample(array("f", [float("-inf")] * 3), SamplingParams(temperature=1.0), fixed) == 0
    penalty = SamplingParams(repetition_penalty=10.0)  # greedy: the penalty still applies, as in sample_next
    assert model.sample(array("f", [1.0, 3.0, 2.0]), penalty, fixed, seen={1}) == 2
    assert model.sample(array("f", [-1.0, -0.5, -2.0]), penalty, fixed, seen={1}) == 0
    lib, x = model.lib, array("f", [1.0, 2.0])
    for bad in [(0.0, 0, 1.0, 0.5), (1.0, -1, 1.0, 0.5), (1.0, 0, 0.0, 0.5), (1.0, 0, 1.0, 1.0)]:
        assert lib.mb_sample(x.buffer_info()[0], 2, *bad) == -1  # temperature, top_k, top_p, u out of range


def test_a_sampled_lean_generation_is_reproducible_and_stays_in_the_nucleus(tied_quantized, tokenizer_dir):
    """Seeded sampling: the same seed gives the same text; every drawn token is one the default runtime
    could draw at that step (inside its top-k / top-p set, computed on its own logits)."""
    from fixtures import sampling_distribution
    from mobillama.infer.sampling import SamplingParams, apply_repetition_penalty
    from mobillama.tokenizer import encode_prompt, load_tokenizer

    ckpt = tied_quantized("all", 4)
    tokenizer = load_tokenizer(ckpt)
    model = lean.LeanModel.open(ckpt, quiet=True)
    options = dict(max_new_tokens=16, temperature=4.0, top_k=40, top_p=0.95, repetition_penalty=1.3)
    runs = [lean.lean_generate(model, tokenizer, "hello world", seed=seed, **options) for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0]["token_ids"] != runs[2]["token_ids"]
    ids = encode_prompt(tokenizer, "hello world")
    drawn = runs[0]["token_ids"] + ([runs[0]["stop_token"]] if runs[0]["stop_token"] is not None else [])
    params = SamplingParams(**options)
    dec = torch_decoder(ckpt)
    steps = torch_steps(dec, ids + drawn)[len(ids) - 1 :]
    seen = torch.zeros(len(steps[0]), dtype=torch.bool)
    seen[ids] = True
    for token, logits in zip(drawn, steps, strict=False):
        penalized = apply_repetition_penalty(torch.from_numpy(logits), seen, params.repetition_penalty)
        assert (
            sampling_distribution(penalized, SamplingParams(**{**options, "repetition_penalty": 1.0}))[token]
            > 0
        )
        seen[token] = True
    assert lean.lean_generate(model, tokenizer, "hello world", SamplingParams(**options, seed=5)) == runs[0]
    with pytest.raises(TypeError, match="give params or options, not both"):
        lean.lean_generate(model, tokenizer, "hello world", SamplingParams(), seed=5)
    greedy = lean.lean_generate(model, tokenizer, "hello world", max_new_tokens=16)
    assert lean.lean_generate(model, tokenizer, "hello world", max_new_tokens=16, temperature=5.0, top_k=1,
                              seed=1)["token_ids"] == greedy["token_ids"]  # fmt: skip


@pytest.mark.parametrize("isa", ISAS)
def test_the_lean_process_never_imports_torch(tied_quantized, isa):
    ckpt = tied_quantized("all", 4)
    cmd = [sys.executable, "-m", "mobillama", "bench", str(ckpt), "--lean", "--json"]
    proc = subprocess.run(
        [*cmd, "--prompt-len", "8", "--new-tokens", "4", "--threads", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, clib.ISA_ENV: isa},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch_imported"] is False and result["numpy_imported"] is False
    assert result["runtime"] == "lean" and result["kernel_used"] == ("vnni" if isa == "avx512" else "avx2")
    assert result["decode_tok_s"] > 0 and result["peak_rss_bytes"] > 0
    assert "kernel image" in proc.stderr  # the first use wrote it, and said so


def test_the_image_is_written_once_and_follows_the_checkpoint(tied_quantized, tmp_path, image_cache):
    src = tied_quantized("all", 8)
    ckpt = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(src), str(ckpt)], check=True)
    first = lean.ensure_image(ckpt, quiet=True)
    stamp = first.stat().st_mtime_ns
    assert lean.ensure_image(ckpt, quiet=True) == first and first.stat().st_mtime_ns == stamp
    (ckpt / "model.safetensors").touch()  # a changed checkpoint gets a new image
    second = lean.ensure_image(ckpt, quiet=True)
    assert second != first and second.is_file()
    assert sorted(p.name for p in image_cache.iterdir()) == sorted([first.name, second.name])  # no leftovers


def test_damaged_or_foreign_images_are_refused(tied_quantized, tmp_path):
    image = lean.ensure_image(tied_quantized("all", 4), quiet=True)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(MobiLlamaError, match="cut.safetensors.*truncated"):
        lean.LeanModel(cut)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(4, np.float32)}, str(foreign))
    with pytest.raises(MobiLlamaError, match="foreign.safetensors: not a kernel image"):
        lean.LeanModel(foreign)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(MobiLlamaError, match="empty.safetensors: not a readable safetensors file"):
        lean.LeanModel(empty)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden", 96, "norm holds 256 bytes, its shape needs 384"),
        ("vocab", 10**6, "head"),
        ("head_dim", 12, "bad model dimensions"),
        ("version", 99, "format version 99"),
    ],
)
def test_an_image_whose_metadata_does_not_match_its_tensors_is_refused(
    tied_quantized, tmp_path, field, value, message
):
    """The C code trusts the sizes it is given: a tampered description must never reach it."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    image = lean.ensure_image(tied_quantized("all", 4), quiet=True)
    with safe_open(str(image), framework="numpy") as f:
        meta = json.loads(f.metadata()[lean.IMAGE_KEY])
    meta[field] = value
    bad = tmp_path / "tampered.safetensors"
    save_file(load_file(str(image)), str(bad), metadata={lean.IMAGE_KEY: json.dumps(meta)})
    with pytest.raises(
        MobiLlamaError, match=f"tampered.safetensors: not a kernel image of this version.*{message}"
    ):
        lean.LeanModel(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"group": 0}, "qkv: bad matrix description"),
        ({"per": 3}, "qkv: bad matrix description"),
        ({"bits": 8, "per": 6}, "qkv: bad matrix description"),
        ({"per": 0}, "ffn.0.down.p holds"),  # codes described as half floats: the sizes disagree
    ],
)
def test_an_image_whose_matrix_description_is_tampered_is_refused(tied_quantized, tmp_path, change, message):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    image = lean.ensure_image(tied_quantized("all", 4), quiet=True)
    with safe_open(str(image), framework="numpy") as f:
        meta = json.loads(f.metadata()[lean.IMAGE_KEY])
    assert meta["ffns"]["0"]["down"]["per"] == 6  # intermediate 192: six groups of 32 take 8-bit codes
    target = meta["ffns"]["0"]["down"] if "per" in change and change["per"] == 0 else meta["layers"][0]["qkv"]
    target.update(change)
    bad = tmp_path / "tampered.safetensors"
    save_file(load_file(str(image)), str(bad), metadata={lean.IMAGE_KEY: json.dumps(meta)})
    with pytest.raises(MobiLlamaError, match=f"not a kernel image of this version.*{message}"):
        lean.LeanModel(bad)


def test_without_the_kernels_the_model_is_refused_before_any_call(tied_quantized, monkeypatch):
    image = lean.ensure_image(tied_quantized("all", 4), quiet=True)
    monkeypatch.setenv("MOBILLAMA_KERNELS", "0")
    with pytest.raises(
        MobiLlamaError, match="needs the project's CPU kernels: disabled by MOBILLAMA_KERNELS=0"
    ):
        lean.LeanModel(image)


def test_bad_requests_are_one_line_errors(tied_quantized):
    model = lean.LeanModel.open(tied_quantized("all", 4), quiet=True)
    with pytest.raises(MobiLlamaError, match="token id 100000 is outside the vocabulary"):
        model.greedy([1, 100000], 2)
    with pytest.raises(MobiLlamaError, match="token id -1"):
        model.greedy([-1], 2)
    with pytest.raises(MobiLlamaError, match="token ids must be integers"):
        model.greedy(["5"], 2)
    with pytest.raises(MobiLlamaError, match="max_new_tokens must be a positive integer"):
        model.greedy([5], 0)
    with pytest.raises(MobiLlamaError, match="prompt is empty"):
        model.greedy([], 2)
    with pytest.raises(MobiLlamaError, match="do not fit the model's context"):
        model.start(model.max_positions + 1)
    model.start(3)
    model.prefill([1, 2])
    model.decode(3)
    with pytest.raises(MobiLlamaError, match="exceed this request's 3"):
        model.decode(4)
    with pytest.raises(MobiLlamaError, match="threads must be >= 1"):
        lean.LeanModel(model.path, threads=0)


def test_cli_lean_errors(tied_quantized, tied_checkpoints, capsys, monkeypatch):
    ckpt = str(tied_quantized("all", 4))
    assert main(["bench", ckpt, "--lean", "--bits", "4", "--batch", "2"]) == 2
    assert "drop --bits, --batch" in capsys.readouterr().err
    assert main(["bench", str(tied_checkpoints["all"]), "--lean"]) == 2
    assert "not a quantized checkpoint directory (no quantization.json)" in capsys.readouterr().err
    assert main(["bench", ckpt, "--lean", "--prompt-len", "0"]) == 2
    assert "prompt_len must be a positive integer" in capsys.readouterr().err
    monkeypatch.setenv("MOBILLAMA_KERNELS", "0")
    assert main(["bench", ckpt, "--lean"]) == 2
    assert "the lean runtime needs the project's CPU kernels: disabled by MOBILLAMA_KERNELS=0" in (
        capsys.readouterr().err
    )


def test_cli_lean_bench_table(tied_quantized, capsys):
    assert (
        main(["bench", str(tied_quantized("none", 8)), "--lean", "--prompt-len", "8", "--new-tokens", "4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "lean runtime" in out and "peak RSS (run / load)" in out and "tok/s" in out


def test_a_checkpoint_off_the_kernel_has_no_image(tied_quantized, tmp_path):
    """An image is only written for a model whose every projection runs on the vnni kernel."""
    ckpt = tmp_path / "odd"
    subprocess.run(["cp", "-r", str(tied_quantized("all", 8)), str(ckpt)], check=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["head_dim"] = 8  # the fused attention kernel needs a multiple of 16
    config["num_attention_heads"] *= 2
    config["num_key_value_heads"] *= 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        MobiLlamaError,
        match="could not write its kernel image: .*needs every projection on the project.s int8/int4 kernel",
    ):
        lean.ensure_image(ckpt, quiet=True)


@pytest.mark.parametrize("extra", [[], ["--json"], ["--stream", "--stop", "a"]])
def test_cli_generate_lean_prints_what_the_default_runtime_prints(tied_quantized, capsys, extra):
    ckpt = str(tied_quantized("all", 4))
    args = ["generate", ckpt, "--prompt", "hello world", "--max-new-tokens", "12", *extra]
    assert main(args) == 0
    default = capsys.readouterr().out
    assert main([*args, "--lean"]) == 0
    assert capsys.readouterr().out == default


def test_cli_generate_lean_never_imports_torch(tied_quantized):
    code = (
        "import sys; from mobillama.cli import main; "
        f"rc = main(['generate', {str(tied_quantized('all', 8))!r}, '--prompt', 'hi', '--lean', '--max-new-tokens', '4']); "
        "print('torch' in sys.modules, rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False 0"


def test_cli_generate_lean_refuses_what_it_cannot_do(tied_quantized, capsys):
    ckpt = str(tied_quantized("all", 4))
    cases = [
        (["--temperature", "-1"], "temperature must be >= 0 (0 = greedy), got -1.0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (["--top-k", "-2", "--temperature", "1"], "top_k must be >= 0 (0 = off), got -2"),
        (["--prompt", "second"], "--lean takes one --prompt"),
        (["--bits", "8"], "--lean runs a quantized checkpoint as stored: drop --bits"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    ]
    for extra, message in cases:
        assert main(["generate", ckpt, "--prompt", "hi", "--lean", *extra]) == 2
        assert message in capsys.readouterr().err
