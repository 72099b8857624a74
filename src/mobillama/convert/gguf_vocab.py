"""GGUF vocabularies <-> Hugging Face tokenizers, so both sides tokenize text the same way.

llama.cpp describes a tokenizer with ``tokenizer.ggml.*`` metadata: the model kind (``gpt2`` = byte-level
BPE with merges, ``llama`` = SentencePiece-style BPE ranked by scores), the token list with types and
scores, the merges, the special ids, the add-BOS/EOS flags and, for byte-level BPE, a *pre-tokenizer
name* (``tokenizer.ggml.pre``) that selects the regular expressions llama.cpp splits text with before
BPE. A tokenizer rebuilt from the file must split text with the same expressions, or it tokenizes
differently (transformers' own GGUF loader, for one, drops SmolLM's digit splitting).

The expressions are data that both runtimes must agree on, so they live in one table here
(:data:`PRE_TOKENIZER_REGEXES`), used in both directions:

- import (:func:`backend_from_gguf_bpe`): the name becomes a ``tokenizers`` pre-tokenizer that applies the
  same expressions in the same order (each splits the pieces the previous one produced, keeping the text
  between matches as pieces of its own: ``Split(..., "isolated")``), then byte-level mapping;
- export (:func:`gguf_pre_tokenizer_name`): a ``tokenizer.json`` pre-tokenizer is read back into its list
  of expressions and looked up, so ``convert to-gguf`` writes the name llama.cpp needs.

Only names whose expressions are listed are supported; anything else is a one-line error, never a
silent fallback to a different split.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from mobillama.errors import MobiLlamaError

# GPT-2's split (also what ``pre_tokenizers.ByteLevel(use_regex=True)`` applies).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SINGLE_DIGIT_REGEX = r"\p{N}"

# tokenizer.ggml.pre -> the expressions llama.cpp applies, in order. The first name of a group with the
# same expressions is the one written on export.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "gpt2": (GPT2_REGEX,),
    "gpt-2": (GPT2_REGEX,),
    "mpt": (GPT2_REGEX,),
    "olmo": (GPT2_REGEX,),
    "smollm": (SINGLE_DIGIT_REGEX, GPT2_REGEX),
    "starcoder": (SINGLE_DIGIT_REGEX, GPT2_REGEX),
    "refact": (SINGLE_DIGIT_REGEX, GPT2_REGEX),
    "llama-bpe": (LLAMA3_REGEX,),
    "llama3": (LLAMA3_REGEX,),
    "dbrx": (LLAMA3_REGEX,),
    "smaug-bpe": (LLAMA3_REGEX,),
    "qwen2": (QWEN2_REGEX,),
    "stablelm2": (QWEN2_REGEX,),
    # llama.cpp's fallback for a byte-level BPE whose file names no (or an unknown-to-it) pre-tokenizer.
    "default": (
        r"[\p{P}\$\+<=>\^~\|]+",
        GPT2_REGEX,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
}

# Pre-tokenizers for which llama.cpp takes a piece found whole in the vocabulary as one token.
IGNORE_MERGES = ("llama-bpe", "llama3")
# Pre-tokenizers for which llama.cpp adds BOS when the file does not say (byte-level BPE otherwise not).
ADD_BOS_BY_DEFAULT = ("llama-bpe", "llama3")

# GGUF token types (gguf.TokenType; the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def pre_tokenizer_for(name: str) -> Any:
    """The ``tokenizers`` pre-tokenizer that splits text as llama.cpp's pre-tokenizer ``name`` does."""
    if name not in PRE_TOKENIZER_REGEXES:
        raise MobiLlamaError(
            f"pre-tokenizer {name!r} (tokenizer.ggml.pre) is not supported; supported: "
            f"{', '.join(PRE_TOKENIZER_REGEXES)}"
        )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[name]]
    return pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def backend_from_gguf_bpe(
    tokens: list[str],
    types: list[int],
    merges: list[str],
    pre: str,
    *,
    bos: str | None,
    eos: str | None,
    add_bos: bool,
    add_eos: bool,
) -> Any:
    """A ``tokenizers.Tokenizer`` for a GGUF byte-level BPE (``tokenizer.ggml.model == "gpt2"``).

    Control tokens become special added tokens (matched in prompts, skipped when decoding with
    ``skip_special_tokens``); user-defined tokens become plain added tokens. The post-processor adds BOS
    and EOS exactly where the file's add-BOS/EOS flags say.
    """
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise MobiLlamaError(f"token {dup!r} appears twice in tokenizer.ggml.tokens")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise MobiLlamaError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    # llama.cpp looks a whole Llama-3-style piece up in the vocabulary before merging; others always merge.
    backend = Backend(BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES))
    backend.pre_tokenizer = pre_tokenizer_for(pre)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    specials = [(t, vocab[t]) for t, add in ((bos, add_bos), (eos, add_eos)) if add and t is not None]
    if specials:
        head = f"{bos}:0 " if add_bos and bos is not None else ""
        tail = f" {eos}:0" if add_eos and eos is not None else ""
        backend.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} $B:1", special_tokens=specials
        )
    return backend


def spm_model_from_gguf(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    unk: int | None,
    bos: int | None,
    eos: int | None,
    pad: int | None,
    add_space_prefix: bool,
) -> bytes:
    """A SentencePiece BPE ``tokenizer.model`` for a GGUF ``llama`` vocabulary (pieces ranked by score).

    Serialising the file's vocabulary as the SentencePiece model it came from lets the project load it
    through its one SentencePiece converter and keeps a ``tokenizer.model`` in the checkpoint (which
    ``convert to-gguf`` writes back unchanged).
    """
    # protobuf's generated module (~0.15 s): only SentencePiece vocabularies need it
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for tok, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score = tok, float(score)
        piece.type = kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(k == BYTE for k in types)
    spec.unk_id = unk if unk is not None else 0
    spec.bos_id = bos if bos is not None else -1
    spec.eos_id = eos if eos is not None else -1
    spec.pad_id = pad if pad is not None else -1
    for attr, idx in (("unk_piece", spec.unk_id), ("bos_piece", spec.bos_id), ("eos_piece", spec.eos_id)):
        if 0 <= idx < len(tokens):
            setattr(spec, attr, tokens[idx])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def _split_regexes(pre_tokenizer: dict[str, Any] | None) -> list[str] | None:
    """The expressions a tokenizer.json pre-tokenizer splits with, in order; None if not expressible."""
    if pre_tokenizer is None:
        return []
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for step in pre_tokenizer.get("pretokenizers") or []:
            part = _split_regexes(step)
            if part is None:
                return None
            out += part
        return out
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space"):
            return None
        return [GPT2_REGEX] if pre_tokenizer.get("use_regex", True) else []
    if kind == "Digits":
        return [SINGLE_DIGIT_REGEX] if pre_tokenizer.get("individual_digits") else [r"\p{N}+"]
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        if pre_tokenizer.get("behavior") != "Isolated" or pre_tokenizer.get("invert"):
            return None
        regex = pattern.get("Regex")
        return [regex] if isinstance(regex, str) else None
    return None


def gguf_pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json``, or None if it has none."""
    regexes = _split_regexes(tokenizer_json.get("pre_tokenizer"))
    if not regexes:
        return None
    return next((name for name, rs in PRE_TOKENIZER_REGEXES.items() if list(rs) == regexes), None)
