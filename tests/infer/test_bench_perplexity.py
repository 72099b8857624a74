"""``mobillama bench --perplexity-text``: the timed model's perplexity on a text file (llama.cpp's windowed
method, BOS by the tokenizer's rule) next to its speed, and one-line errors for bad text files."""

from __future__ import annotations

import json

import pytest

from mobillama.cli import main
from mobillama.eval.perplexity import windowed_perplexity
from mobillama.infer.bench import perplexity_ids
from mobillama.infer.load import load_checkpoint_tokenizer, load_for_inference
from mobillama.infer.quant import kernels_in_use

from .conftest import HELD_OUT_FILES, stdlib_text

FAST = ["--prompt-len", "8", "--new-tokens", "3", "--no-roofline", "--threads", "1"]
PPL = ["--perplexity-ctx", "64", "--perplexity-windows", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(stdlib_text(HELD_OUT_FILES), encoding="utf-8")
    return path


def test_bench_reports_the_perplexity_of_the_timed_model(tiny_checkpoint, text_file, capsys):
    assert (
        main(["bench", str(tiny_checkpoint), *FAST, *PPL, "--perplexity-text", str(text_file), "--json"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    p = r["perplexity"]
    assert p["windows"] == 2 and p["ctx"] == 64 and p["scored_tokens"] == 2 * 31
    assert p["bos"] is True  # this tokenizer puts <s> in front of plain text (Llama's convention)
    assert p["text"] == str(text_file) and r["decode_tok_s"] > 0
    # the same figure as scoring the same model directly: the bench adds no scoring rules of its own
    tok = load_checkpoint_tokenizer(tiny_checkpoint)
    ids, bos = perplexity_ids(tok, text_file.read_text(encoding="utf-8"))
    assert ids[0] == bos == tok.bos_id
    want = windowed_perplexity(
        load_for_inference(tiny_checkpoint, dtype="bf16"), ids, ctx=64, bos_id=bos, max_windows=2
    )
    assert p["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert main(["bench", str(tiny_checkpoint), *FAST, *PPL, "--perplexity-text", str(text_file)]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_quantized_options_report_their_perplexity_and_kernel(tiny_checkpoint, text_file, capsys):
    cmd = ["bench", str(tiny_checkpoint), *FAST, *PPL, "--perplexity-text", str(text_file), "--json"]
    assert main([*cmd, "--bits", "4", "--group-size", "32", "--int4-kernel", "reference"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bits"] == 4 and r["group_size"] == 32 and r["kernel_used"] == "reference"
    assert r["perplexity"]["perplexity"] > 1
    assert main([*cmd, "--bits", "8", "--int8-kernel", "weight_only"]) == 0
    assert json.loads(capsys.readouterr().out)["kernel_used"] == "weight_only"


def test_no_bos_where_the_tokenizer_adds_none(smol_checkpoint):
    tok = load_checkpoint_tokenizer(smol_checkpoint)
    ids, bos = perplexity_ids(tok, "The quick brown fox. <|im_end|>")
    assert bos is None and ids == tok.encode("The quick brown fox. <|im_end|>", parse_special=False)
    assert 2 not in ids  # <|im_end|> (id 2) written in a document stays characters


def test_kernels_in_use_is_none_unquantized(byte_model):
    assert kernels_in_use(byte_model()) is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"", "is empty"),
        (b"  \n\t\n", "is empty"),
        (b"def f():\n    return 1\n", "fewer than one window of 64"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50, "binary file"),
        ("caf\u00e9 ".encode("latin-1") * 200, "not UTF-8"),
    ],
)
def test_bad_perplexity_text_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["bench", str(tiny_checkpoint), *FAST, *PPL, "--perplexity-text", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("micro", [], "needs a checkpoint directory"),
        (None, ["--perplexity-ctx", "512"], "exceeds the model's context 256"),
        (None, ["--perplexity-ctx", "63"], "even number"),
        (None, ["--perplexity-windows", "0"], "perplexity_windows must be"),
    ],
)
def test_perplexity_options_that_cannot_work(tiny_checkpoint, text_file, capsys, model, extra, message):
    spec = model or str(tiny_checkpoint)
    cmd = ["bench", spec, *FAST, *PPL, *extra, "--perplexity-text", str(text_file)]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
