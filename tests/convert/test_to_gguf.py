"""``convert to-gguf``: the file reads back with gguf's reader with llama.cpp's names, shapes, types, metadata."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from mobillama.checkpoint import load_checkpoint, save_checkpoint
from mobillama.config import get_preset
from mobillama.convert import export_gguf, read_gguf_weights
from mobillama.convert.to_gguf import permute_for_gguf, unpermute_from_gguf
from mobillama.convert.to_llama import llama_state_dict
from mobillama.errors import MobiLlamaError
from mobillama.model import MobiLlama, apply_rope, rope_cos_sin

GG = gguf.GGMLQuantizationType
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _llama_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    if base in top:
        return top[base] + ".weight"
    _, i, part = base.split(".")
    return f"model.layers.{i}.{LAYER_NAMES[part]}.weight"


@pytest.fixture
def ckpt(tmp_path, rel):
    """A tiny shared-FFN checkpoint with GQA (2 kv heads) and a tokenizer (300 tokens, model vocab 384)."""
    torch.manual_seed(0)
    config = get_preset("micro").replace(vocab_size=384, intermediate_size=128)
    rel.make_tokenizer(tmp_path / "tok")
    save_checkpoint(MobiLlama(config), config, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    return tmp_path / "ckpt"


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def test_f16_reads_back_with_llama_cpp_names_metadata_and_weights(tmp_path, ckpt):
    report = export_gguf(ckpt, tmp_path / "m.gguf")
    config, state = load_checkpoint(ckpt)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    meta = _fields(reader)
    assert meta["general.architecture"] == "llama"
    expected_meta = {
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 4,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 384,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
    }
    assert {k: meta[k] for k in expected_meta} == expected_meta
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)

    # Tokenizer metadata from the checkpoint's tokenizer.json (padded to the model's vocab).
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "llama"
    tokens, types, scores = (
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.token_type"],
        meta["tokenizer.ggml.scores"],
    )
    assert len(tokens) == len(types) == len(scores) == 384
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and tokens[-1] == "[PAD383]"
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and types[-1] == gguf.TokenType.UNUSED
    first_merge = tok["model"]["merges"][0]
    merged = "".join(first_merge) if isinstance(first_merge, list) else first_merge.replace(" ", "")
    assert scores[tokens.index(merged)] == 0.0 and max(scores) == 0.0  # the first merge ranks highest
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert any("padded" in n for n in report.notices)

    expected = llama_state_dict(config, state)
    names = [t.name for t in reader.tensors]
    assert names[0] == "token_embd.weight" and names[-2:] == ["output_norm.weight", "output.weight"]
    assert {"blk.3.ffn_gate.weight", "blk.0.attn_output.weight"} <= set(names)
    assert sorted(_llama_name(n) for n in names) == sorted(expected)
    for t in reader.tensors:
        weight = expected[_llama_name(t.name)]
        assert list(reversed(t.shape.tolist())) == list(weight.shape)  # GGUF lists dimensions innermost first
        assert t.tensor_type == (GG.F32 if weight.dim() == 1 else GG.F16)
        data = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(weight.shape)
        if t.name.endswith("attn_q.weight"):
            data = unpermute_from_gguf(data, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            data = unpermute_from_gguf(data, config.num_key_value_heads)
        ref = weight.float() if weight.dim() == 1 else weight.half().float()
        assert torch.equal(data, ref), t.name
    # The shared FFN is stored once per layer (GGUF cannot alias tensors).
    gate = {t.name: np.array(t.data) for t in reader.tensors if t.name.endswith("ffn_gate.weight")}
    assert len(gate) == 4 and all(np.array_equal(v, gate["blk.0.ffn_gate.weight"]) for v in gate.values())
    assert meta["mobillama.ffn_sharing"] == "all"


@pytest.mark.parametrize(
    ("gguf_type", "qtype", "rel_tol"), [("q8_0", GG.Q8_0, 0.01), ("q4_0", GG.Q4_0, 0.15)]
)
def test_quantized_types(tmp_path, ckpt, gguf_type, qtype, rel_tol):
    report = export_gguf(ckpt, tmp_path / "m.gguf", gguf_type=gguf_type)
    config, state = load_checkpoint(ckpt)
    expected = llama_state_dict(config, state)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _fields(reader)["general.file_type"] == int(
        {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    )
    assert report.tensor_types == {qtype.name: 4 * 7 + 2, "F32": 4 * 2 + 1}
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert all(v == (GG.F32 if "norm" in k else qtype) for k, v in types.items())
    for key, data in read_gguf_weights(tmp_path / "m.gguf").items():  # dequantized, q/k un-permuted
        weight = expected[key].float()
        err = (data - weight).norm() / weight.norm()
        assert err < (1e-7 if weight.dim() == 1 else rel_tol), (key, err.item())


def test_read_gguf_weights_inverts_the_export(tmp_path, ckpt):
    export_gguf(ckpt, tmp_path / "m.gguf")
    config, state = load_checkpoint(ckpt)
    expected = llama_state_dict(config, state)
    back = read_gguf_weights(tmp_path / "m.gguf")
    assert list(back) == list(expected)
    assert all(
        torch.equal(back[k], expected[k].half().float() if v.dim() == 2 else v) for k, v in expected.items()
    )
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(MobiLlamaError, match="not a readable GGUF file"):
        read_gguf_weights(tmp_path / "bad.gguf")


def test_rows_not_divisible_by_block_fall_back_to_f16(tmp_path):
    torch.manual_seed(0)
    config = get_preset("micro")  # intermediate 176: ffn_down rows are not a multiple of 32
    save_checkpoint(MobiLlama(config), config, tmp_path / "ckpt")
    report = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", gguf_type="q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.2.ffn_down.weight"] == GG.F16 and types["blk.2.ffn_up.weight"] == GG.Q4_0
    assert any("4 tensors" in n and "F16" in n for n in report.notices)
    assert any("no tokenizer" in n for n in report.notices)  # and no vocabulary was invented
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "no_vocab" and "tokenizer.ggml.tokens" not in fields


def test_permutation_turns_rotate_half_rope_into_interleaved_rope():
    """q·k with HF rotate-half RoPE on the original rows == with GGML's interleaved RoPE on permuted rows."""
    torch.manual_seed(0)
    heads, head_dim, hidden, pos = 2, 8, 16, torch.tensor([[0, 3, 7]])
    wq, wk = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden)
    x = torch.randn(1, 3, hidden)
    cos, sin = rope_cos_sin(pos, head_dim, 10000.0, torch.float32)

    def hf(w):  # [1, heads, T, d] with rotate-half RoPE (the project's and transformers' convention)
        return apply_rope((x @ w.T).view(1, 3, heads, head_dim).transpose(1, 2), cos, sin)

    def ggml(w):  # GGML "normal" RoPE: rotate adjacent pairs (2j, 2j+1) by pos * theta^(-2j/d)
        v = (x @ w.T).view(1, 3, heads, head_dim // 2, 2)
        freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        ang = pos[0][:, None, None].float() * freq
        c, s = ang.cos(), ang.sin()
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).view(1, 3, heads, head_dim).transpose(1, 2)

    scores_hf = hf(wq) @ hf(wk).transpose(-1, -2)
    scores_ggml = ggml(permute_for_gguf(wq, heads)) @ ggml(permute_for_gguf(wk, heads)).transpose(-1, -2)
    assert torch.allclose(scores_hf, scores_ggml, atol=1e-4)
    assert not torch.allclose(scores_hf, ggml(wq) @ ggml(wk).transpose(-1, -2), atol=1e-2)  # it matters
    assert torch.equal(unpermute_from_gguf(permute_for_gguf(wq, heads), heads), wq)


def test_bad_input(tmp_path, ckpt, rel):
    with pytest.raises(MobiLlamaError, match="unknown GGUF type 'q5_k'"):
        export_gguf(ckpt, tmp_path / "m.gguf", gguf_type="q5_k")
    with pytest.raises(MobiLlamaError, match="checkpoint not found"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf")
    with pytest.raises(MobiLlamaError, match="is a directory"):
        export_gguf(ckpt, tmp_path)
    (tmp_path / "exists.gguf").write_bytes(b"old")
    with pytest.raises(MobiLlamaError, match="already exists"):
        export_gguf(ckpt, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"old"

    # A tokenizer llama.cpp's llama vocabulary cannot express: refused, nothing written.
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["model"]["type"] = "WordPiece"
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MobiLlamaError, match="tokenizer model 'WordPiece' is not supported"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    (ckpt / "tokenizer.json").write_text("{truncated")
    with pytest.raises(MobiLlamaError, match="tokenizer.json: not valid JSON"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not rel.leftovers(tmp_path, "m.gguf")


def test_overwrite_is_atomic(tmp_path, ckpt, rel):
    (tmp_path / "m.gguf").write_bytes(b"old")
    export_gguf(ckpt, tmp_path / "m.gguf", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    assert not rel.leftovers(tmp_path, "m.gguf")


def test_sentencepiece_tokenizer_model(tmp_path):
    """A SentencePiece tokenizer.model (the original Llama-2 tokenizer's format) is read with gguf's vocab."""
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    text.write_text("the shared feed forward network is used by every layer\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=280,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    torch.manual_seed(0)
    config = get_preset("micro").replace(vocab_size=384)
    save_checkpoint(MobiLlama(config), config, tmp_path / "ckpt")
    (tmp_path / "tokenizer.model").rename(tmp_path / "ckpt" / "tokenizer.model")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    meta = _fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "ckpt" / "tokenizer.model"))
    n = processor.vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"][:n] == [processor.id_to_piece(i) for i in range(n)]
    assert meta["tokenizer.ggml.scores"][n - 1] == pytest.approx(processor.get_score(n - 1))
    assert meta["tokenizer.ggml.token_type"][processor.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert meta["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL  # <s>


def test_tied_embeddings_have_no_output_tensor(tmp_path):
    torch.manual_seed(0)
    config = get_preset("micro").replace(tie_word_embeddings=True)
    save_checkpoint(MobiLlama(config), config, tmp_path / "ckpt")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp then reuses token_embd


@pytest.mark.parametrize("sharing", ["none", "all"])
def test_a_tied_export_reads_back_as_a_tied_llama_with_the_same_logits(tmp_path, sharing):
    """SmolLM2-like (tied, GQA): the file's weights in a stock tied LlamaForCausalLM (whose head is
    its token embedding, as llama.cpp's fallback makes it) give the checkpoint's logits."""
    from transformers import LlamaForCausalLM

    from mobillama.convert import llama_config

    torch.manual_seed(0)
    config = get_preset("micro").replace(tie_word_embeddings=True, ffn_sharing=sharing)
    model = MobiLlama(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    save_checkpoint(model, config, tmp_path / "ckpt")
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    state = read_gguf_weights(tmp_path / "m.gguf")
    assert "lm_head.weight" not in state
    llama = LlamaForCausalLM(llama_config(config, torch.float32)).eval()
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        want, got = model(ids), llama(ids).logits
    assert (got - want).abs().max().item() < 1e-2 * want.abs().max().item()  # f16 weights


def test_failure_mid_write_leaves_nothing(tmp_path, ckpt, rel, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.quants, "quantize", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, tmp_path / "m.gguf", gguf_type="q8_0")
    assert not (tmp_path / "m.gguf").exists() and not rel.leftovers(tmp_path, "m.gguf")
