"""Converting a Llama-2-format SentencePiece ``tokenizer.model`` to a Hugging Face fast tokenizer.

A module of its own because the conversion is the project's, not transformers': it ranks BPE merges by
piece score as SentencePiece does (transformers 5 ranks them by piece id, which splits runs of spaces
differently for the Mistral/Llama family), and it is used both when loading a ``tokenizer.model`` and when
importing a GGUF file's tokenizer.
"""

from __future__ import annotations

from typing import Any

from mobillama.errors import MobiLlamaError
from mobillama.tokenizer.llama_format import _llama_pipeline, _wrap_backend


def sentencepiece_to_hf(model_bytes: bytes, origin: str) -> Any:
    """Convert a SentencePiece BPE ``tokenizer.model`` (Llama-2 format) to an HF fast tokenizer.

    Written here rather than through transformers' converter because transformers 5 orders the BPE merges
    by piece id, not by piece score; SentencePiece merges by score, so for models whose whitespace pieces
    have low scores (``▁▁`` at -1e9 in the Mistral/Llama family) the converted tokenizer splits runs of
    spaces differently from SentencePiece itself. Ordering merges by score reproduces SentencePiece.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece is a dependency
        raise MobiLlamaError(f"reading {origin} needs sentencepiece and protobuf installed ({e})") from None
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise MobiLlamaError(f"{origin}: not a SentencePiece model ({type(e).__name__})") from None
    if not proto.pieces:
        raise MobiLlamaError(f"{origin}: not a SentencePiece model (no pieces)")
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise MobiLlamaError(f"{origin}: only BPE SentencePiece models (Llama format) are supported")
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
        raise MobiLlamaError(
            f"{origin}: SentencePiece normalisation rules are not supported (Llama-format models use none)"
        )
    piece_type = pb.ModelProto.SentencePiece.Type
    normal, special, user = (
        piece_type.NORMAL,
        (piece_type.UNKNOWN, piece_type.CONTROL),
        piece_type.USER_DEFINED,
    )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal_ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == normal}
    # SentencePiece BPE repeatedly merges the adjacent pair whose merged piece has the highest score;
    # an HF BPE merge list ranked by that score (ties by the parts' ids) does the same.
    ranked = []
    for piece, pid in normal_ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal_ids and right in normal_ids:
                ranked.append(
                    (-proto.pieces[pid].score, pid, normal_ids[left], normal_ids[right], left, right)
                )
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Backend(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    backend.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in special]
    )
    backend.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == user])
    _llama_pipeline(backend, add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix)
    return _wrap_backend(
        backend,
        unk_token=unk_piece,
        **({"bos_token": proto.trainer_spec.bos_piece} if proto.trainer_spec.bos_id >= 0 else {}),
        **({"eos_token": proto.trainer_spec.eos_piece} if proto.trainer_spec.eos_id >= 0 else {}),
    )
