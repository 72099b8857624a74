"""The inference commands end to end on a tiny checkpoint with a real BPE tokenizer."""

from __future__ import annotations

import io
import json

import pytest

from mobillama.cli import main


def test_generate_greedy_json_and_batch(tiny_checkpoint, capsys):
    args = [
        "generate",
        str(tiny_checkpoint),
        "--prompt",
        "def f(x):",
        "--prompt",
        "import",
        "--max-new-tokens",
        "5",
    ]
    assert main([*args, "--json", "--dtype", "fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["finish_reason"] in ("stop", "length") for c in out] == [True, True]
    assert all(c["prompt_tokens"] > 0 and 1 <= c["completion_tokens"] <= 5 for c in out)
    assert main([*args, "--dtype", "fp32"]) == 0
    assert "--- [1]" in capsys.readouterr().out


def test_generate_stream_matches_plain_output(tiny_checkpoint, capsys):
    args = [
        "generate",
        str(tiny_checkpoint),
        "--prompt",
        "class A:",
        "--max-new-tokens",
        "6",
        "--dtype",
        "fp32",
    ]
    main(args)
    plain = capsys.readouterr().out
    main([*args, "--stream"])
    assert capsys.readouterr().out == plain


def test_generate_sampling_with_seed_is_reproducible_and_bits_work(tiny_checkpoint, capsys):
    args = [
        "generate",
        str(tiny_checkpoint),
        "--prompt",
        "x =",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
    ]
    args += ["--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "7", "--json"]
    main(args)
    first = json.loads(capsys.readouterr().out)
    main(args)
    assert json.loads(capsys.readouterr().out) == first
    for bits in ("8", "4"):
        assert main([*args, "--bits", bits]) == 0
        assert json.loads(capsys.readouterr().out)[0]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--prompt", ""], "empty"),
        (["--stream", "--prompt", "b"], "--stream takes one"),
        (["--threads", "0"], "threads"),
        (["--bits", "4", "--group-size", "48"], "group size"),
    ],
)
def test_generate_bad_input_is_one_error_line(tiny_checkpoint, capsys, extra, message):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "a", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_prompt_longer_than_context(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "word " * 400]) == 2
    assert "context is 256" in capsys.readouterr().err


def test_unknown_checkpoint_path(tmp_path, capsys):
    for cmd in (["generate", str(tmp_path / "nope"), "--prompt", "a"], ["chat", str(tmp_path / "nope")]):
        assert main(cmd) == 2
        assert "checkpoint not found" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), "--bits", "8", "--out", str(tmp_path / "q")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_then_generate_and_bench_from_the_quantized_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "q4"
    assert (
        main(["quantize", str(tiny_checkpoint), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    )
    assert "int4 group 32" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["completion_tokens"] >= 1
    assert main(["generate", str(out), "--prompt", "def", "--bits", "8"]) == 2
    assert "already quantized to 4 bits" in capsys.readouterr().err
    assert main(["bench", str(out), "--prompt-len", "8", "--new-tokens", "3", "--no-roofline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits"] == 4
    assert main(["quantize", str(tiny_checkpoint), "--bits", "8", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_chat_reads_stdin(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nbye\n/exit\n"))
    assert main(["chat", str(tiny_checkpoint), "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 4 and "[conversation cleared]" in out


def test_bench_preset_table(capsys):
    assert main(["bench", "micro", "--prompt-len", "8", "--new-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("prefill", "time to first token", "decode", "peak RSS", "achieved bandwidth", "roofline"):
        assert label in out
    assert main(["bench", "nope-preset"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_bench_kernel_choices_and_a_kernel_that_cannot_run(tiny_checkpoint, capsys, monkeypatch):
    base = [
        "bench",
        str(tiny_checkpoint),
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--no-roofline",
        "--json",
    ]
    assert main([*base, "--bits", "4", "--group-size", "32", "--int4-kernel", "stock"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["bits"], result["int4_kernel"], result["int8_kernel"]) == (4, "stock", None)
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*base, "--bits", "4", "--group-size", "32", "--int4-kernel", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    monkeypatch.setenv("MOBILLAMA_KERNELS", "0")
    for extra in (
        ["--bits", "8", "--int8-kernel", "vnni"],
        ["--bits", "4", "--group-size", "32", "--int4-kernel", "vnni"],
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "vnni kernel cannot run here: disabled by MOBILLAMA_KERNELS=0" in err and err.count("\n") == 1
    assert main([*base, "--bits", "4", "--group-size", "32"]) == 0  # auto falls back to PyTorch's kernel
    assert json.loads(capsys.readouterr().out)["decode_tok_s"] > 0
