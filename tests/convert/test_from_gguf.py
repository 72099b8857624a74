"""``convert from-gguf``: GGUF files written by ``to-gguf`` come back as the same model and tokenizer.

The exporter is checked against llama.cpp elsewhere (test_gguf_llama_cpp.py, test_real_model.py), so an
export -> import round trip that reproduces weights, config, logits and token ids proves the importer's
names, q/k un-permutation, metadata and vocabulary handling on every kind of file the exporter writes.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from fixtures import llama3_scaling
from mobillama.checkpoint import load_checkpoint, load_model, save_checkpoint
from mobillama.config import get_preset
from mobillama.convert import export_gguf, read_gguf_weights
from mobillama.convert.from_gguf import import_gguf
from mobillama.convert.gguf_vocab import PRE_TOKENIZER_REGEXES, gguf_pre_tokenizer_name, pre_tokenizer_for
from mobillama.convert.to_llama import llama_state_dict
from mobillama.errors import MobiLlamaError
from mobillama.model import rope_inv_freq
from mobillama.tokenizer import load_tokenizer

TEXTS = [
    "the shared feed forward network",
    "In 1984, 12345 models   were\n\tused by every layer!",
    "zebra ümlaut — 日本語 🙂",
    "",
]


@pytest.fixture
def rel(rel, smol_builders, realistic_model):
    """The converter fixtures plus the shared SmolLM2-style tokenizer builder and trained-like models."""
    rel.make_bytelevel_tokenizer = smol_builders["tokenizer"]
    rel.realistic_model = realistic_model
    return rel


def _checkpoint(tmp_path, rel, *, tie=False, sharing="all", bytelevel=False, seed=0, rope_scaling=None):
    """A tiny checkpoint at trained-like weight scales (a layout mistake shows in the logits)."""
    config = get_preset("micro").replace(
        vocab_size=512 if bytelevel else 384,
        intermediate_size=128,
        tie_word_embeddings=tie,
        ffn_sharing=sharing,
        rope_scaling=rope_scaling,
    )
    tok = tmp_path / "tok"
    (rel.make_bytelevel_tokenizer if bytelevel else rel.make_tokenizer)(tok)
    save_checkpoint(rel.realistic_model(config, seed), config, tmp_path / "ckpt", tokenizer_dir=tok)
    return tmp_path / "ckpt"


def _logits(path, ids):
    with torch.no_grad():
        return load_model(path).eval()(ids)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("sharing", ["all", "none"])
def test_f16_export_imports_as_the_same_model(tmp_path, rel, tie, sharing):
    ckpt = _checkpoint(tmp_path, rel, tie=tie, sharing=sharing)
    export_gguf(ckpt, tmp_path / "m.gguf")
    report = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    config, state = load_checkpoint(ckpt)
    config_back, state_back = load_checkpoint(tmp_path / "back")
    assert config_back == config  # shape, GQA, eps, theta, tie, sharing (identical FFN copies -> "all")
    assert report.ffn_sharing == sharing and report.source_format == "gguf"
    assert set(state_back) == set(state)
    for key, value in state.items():  # matrices stored as f16, norms as f32
        want = value.half().float() if value.dim() == 2 else value
        assert torch.equal(state_back[key], want), key
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    want, got = _logits(ckpt, ids), _logits(tmp_path / "back", ids)
    assert want.abs().max() > 1.0
    assert (got - want).abs().max() / want.abs().max() < 5e-3


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_export_imports_the_dequantized_values_exactly(tmp_path, rel, gguf_type):
    ckpt = _checkpoint(tmp_path, rel, sharing="none")
    export_gguf(ckpt, tmp_path / "m.gguf", gguf_type=gguf_type)
    config, state = load_checkpoint(import_gguf(tmp_path / "m.gguf", tmp_path / "back") and tmp_path / "back")
    want = read_gguf_weights(tmp_path / "m.gguf")  # dequantized, q/k un-permuted, Llama names
    for key, value in llama_state_dict(config, state).items():
        assert torch.equal(value, want[key]), key


def test_sentencepiece_style_vocabulary_tokenizes_as_before(tmp_path, rel):
    ckpt = _checkpoint(tmp_path, rel)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    export_gguf(ckpt, tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    before, after = load_tokenizer(ckpt), load_tokenizer(tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.model").is_file()  # the vocabulary as the SentencePiece model
    for text in TEXTS:
        assert after.encode(text) == before.encode(text), text
        assert after.decode(after.encode(text)) == text
    assert (after.bos_id, after.eos_id) == (before.bos_id, before.eos_id)
    cfg = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False


def test_byte_level_vocabulary_keeps_pre_tokenizer_flags_and_template(tmp_path, rel):
    ckpt = _checkpoint(tmp_path, rel, bytelevel=True, tie=True)
    report = export_gguf(ckpt, tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert report.vocab == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "smollm"  # digits one by one, then GPT-2's split
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]

    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    before, after = load_tokenizer(ckpt), load_tokenizer(tmp_path / "back")
    for text in TEXTS:
        assert after.encode(text) == before.encode(text), text
        assert after.decode(after.encode(text)) == text
    assert after.encode("12345") == [after.encode(d)[0] for d in "12345"]  # one token per digit
    assert after.encode("<|im_start|>user")[0] == 1  # control tokens are matched in prompts
    messages = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(messages) == before.apply_chat_template(messages)
    cfg = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["bos_token"] == "<|im_start|>"
    assert cfg["eos_token"] == "<|im_end|>"
    # exported again, the file says the same things
    export_gguf(tmp_path / "back", tmp_path / "again.gguf")
    again = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "again.gguf").fields.items()}
    for key in (
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ):
        assert again[key] == fields[key], key


@pytest.mark.parametrize("name", sorted(PRE_TOKENIZER_REGEXES))
def test_every_pre_tokenizer_reads_back_as_its_group(name):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizer_for(name)
    found = gguf_pre_tokenizer_name(json.loads(backend.to_str()))
    assert PRE_TOKENIZER_REGEXES[found] == PRE_TOKENIZER_REGEXES[name]


def test_pre_tokenizer_split_matches_the_hugging_face_form():
    """The split written for 'smollm' cuts text exactly where SmolLM's own tokenizer.json does."""
    from tokenizers import pre_tokenizers

    hf = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ours = pre_tokenizer_for("smollm")
    for text in TEXTS + ["it's 3.14159 -- x=  42\n\n  def f():\n\treturn ²½"]:
        assert [p for p, _ in ours.pre_tokenize_str(text)] == [p for p, _ in hf.pre_tokenize_str(text)]


# --- bad input -------------------------------------------------------------------------------------------


def _fails(tmp_path, src, match):
    with pytest.raises(MobiLlamaError, match=match) as info:
        import_gguf(src, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, rel):
    ckpt = _checkpoint(tmp_path, rel)
    export_gguf(ckpt, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    _fails(tmp_path, tmp_path / "missing.gguf", "not found")
    _fails(tmp_path, tmp_path, "not a file")
    (tmp_path / "text.gguf").write_text("hello")
    _fails(tmp_path, tmp_path / "text.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _fails(tmp_path, tmp_path / "empty.gguf", "not a GGUF file")
    for cut in (16, len(data) // 3, len(data) - 7):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _fails(tmp_path, tmp_path / "cut.gguf", "truncated")
    (tmp_path / "out").mkdir()
    with pytest.raises(MobiLlamaError, match="already exists"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")


def _write_gguf(path, arch="llama", **strings):
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_block_count(1)
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_other_architectures_and_rope_scaling_are_refused(tmp_path):
    _fails(tmp_path, _write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2' is not supported")
    scaled = _write_gguf(tmp_path / "s.gguf", **{"llama.rope.scaling.type": "yarn"})
    _fails(tmp_path, scaled, "RoPE scaling 'yarn'")


def test_rope_frequency_divisors_off_the_llama3_rule_are_refused(tmp_path):
    """rope_freqs that no llama3 parameters reproduce: refused, naming the importer that reads them exactly."""
    writer = gguf.GGUFWriter(tmp_path / "f.gguf", arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.add_tensor("rope_freqs.weight", np.array([1.0, 3.0, 2.0, 7.0], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _fails(
        tmp_path, tmp_path / "f.gguf", "rope_freqs.*do not follow Llama 3's 'llama3' rule.*convert from-hf"
    )


# --- RoPE scaling --------------------------------------------------------------------------------------


def test_linear_rope_scaling_round_trips_through_gguf(tmp_path, rel):
    scaling = {"rope_type": "linear", "factor": 4.0}
    ckpt = _checkpoint(tmp_path, rel, rope_scaling=scaling)
    export_gguf(ckpt, tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
    report = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert any("RoPE scaling 'linear' (factor 4.0)" in n for n in report.notices)
    config, config_back = load_checkpoint(ckpt)[0], load_checkpoint(tmp_path / "back")[0]
    assert config_back == config and config_back.rope_scaling == scaling
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    want, got = _logits(ckpt, ids), _logits(tmp_path / "back", ids)
    assert (got - want).abs().max() / want.abs().max() < 5e-3


@pytest.mark.parametrize(
    ("keys", "factor"),
    [
        ({"llama.rope.scaling.factor": 2.0}, 2.0),  # llama.cpp's default type is linear
        ({"llama.rope.scale_linear": 2.5}, 2.5),  # the key's older name
        ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 3.0}, 3.0),  # applied anyway
        ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}, None),
        ({"llama.rope.scaling.factor": 0.0}, None),  # 0: unset
    ],
)
def test_gguf_linear_scaling_keys_as_llama_cpp_reads_them(tmp_path, rel, monkeypatch, keys, factor):
    from mobillama.convert import to_gguf

    original = to_gguf._write_metadata

    def with_keys(writer, *args):
        original(writer, *args)
        for key, value in keys.items():
            (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)

    monkeypatch.setattr(to_gguf, "_write_metadata", with_keys)
    ckpt = _checkpoint(tmp_path, rel)
    export_gguf(ckpt, tmp_path / "m.gguf")
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    config = load_checkpoint(tmp_path / "back")[0]
    assert config.rope_scaling == (None if factor is None else {"rope_type": "linear", "factor": factor})


def test_gguf_yarn_and_bad_factor_are_refused(tmp_path, rel, monkeypatch):
    from mobillama.convert import to_gguf

    ckpt = _checkpoint(tmp_path, rel, rope_scaling={"rope_type": "linear", "factor": 4.0})
    original = to_gguf._write_metadata
    for name, edit, match in (
        ("yarn", {"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported"),
        ("negative", {"llama.rope.scaling.factor": -2.0}, "rope_scaling: 'factor' must be a positive number"),
    ):

        def edited(writer, config, *args, edit=edit):
            original(writer, config, *args)
            for key, value in edit.items():  # in place of the exporter's value
                writer.kv_data[0].pop(key, None)
                (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)

        monkeypatch.setattr(to_gguf, "_write_metadata", edited)
        export_gguf(ckpt, tmp_path / f"{name}.gguf")
        _fails(tmp_path, tmp_path / f"{name}.gguf", match)


def test_llama3_scaling_round_trips_through_gguf(tmp_path, rel):
    """Written as llama.cpp's converter writes it (rope_freqs divisors) plus the original context; read
    back as the same four parameters and the same logits."""
    scaling = llama3_scaling(64)  # head size 16 at theta 1e4: two frequencies fall in the blended band
    ckpt = _checkpoint(tmp_path, rel, rope_scaling=scaling)
    export_gguf(ckpt, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["llama.rope.scaling.original_context_length"].contents() == 64
    divisors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    assert divisors[0] == 1.0 and divisors[-1] == 8.0 and 1 < divisors[1] < 8  # kept, slowed, blended
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    assert load_checkpoint(tmp_path / "back")[0].rope_scaling == scaling
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(1))
    want, got = _logits(ckpt, ids), _logits(tmp_path / "back", ids)
    assert (got - want).abs().max() / want.abs().max() < 5e-3


def test_llama3_divisors_without_the_original_context_give_the_same_frequencies(tmp_path, rel, monkeypatch):
    """llama.cpp's own converter writes no original context: 8192 is assumed, low/high come out scaled
    to it, and every rotary frequency is the same as the source's."""
    from mobillama.convert import to_gguf

    original = to_gguf._write_metadata

    def without_context(writer, config, *args):
        original(writer, config, *args)
        writer.kv_data[0].pop("llama.rope.scaling.original_context_length")

    monkeypatch.setattr(to_gguf, "_write_metadata", without_context)
    scaling = llama3_scaling(64)
    ckpt = _checkpoint(tmp_path, rel, rope_scaling=scaling)
    export_gguf(ckpt, tmp_path / "m.gguf")
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")[0]
    assert back.rope_scaling["original_max_position_embeddings"] == 8192
    assert back.rope_scaling["factor"] == 8.0 and back.rope_scaling != scaling
    head = back.head_dim
    torch.testing.assert_close(
        rope_inv_freq(head, back.rope_theta, back.rope_scaling), rope_inv_freq(head, back.rope_theta, scaling)
    )


def test_unknown_pre_tokenizer_or_tokenizer_model_is_refused(tmp_path, rel, monkeypatch):
    from mobillama.convert import to_gguf

    ckpt = _checkpoint(tmp_path, rel, bytelevel=True)
    original = to_gguf._write_vocab

    def patched(name, value):
        def write(writer, vocab):
            original(writer, {**vocab, name: value})

        return write

    monkeypatch.setattr(to_gguf, "_write_vocab", patched("pre", "some-new-model"))
    export_gguf(ckpt, tmp_path / "pre.gguf")
    _fails(tmp_path, tmp_path / "pre.gguf", "pre-tokenizer 'some-new-model'")
    monkeypatch.setattr(to_gguf, "_write_vocab", patched("model", "bert"))
    export_gguf(ckpt, tmp_path / "bert.gguf")
    _fails(tmp_path, tmp_path / "bert.gguf", "tokenizer model 'bert' is not supported")


def test_cli_from_gguf(tmp_path, rel, capsys):
    from mobillama.cli import main

    ckpt = _checkpoint(tmp_path, rel, bytelevel=True, tie=True)
    export_gguf(ckpt, tmp_path / "m.gguf")
    assert main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "imported" in out and "tokenizer.json" in out
    assert main(["convert", "from-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
