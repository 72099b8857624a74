"""Tokenizers: train, load and save one kind of object, with the chat template in one place.

Every tokenizer the project touches ends up as a Hugging Face ``tokenizers`` model wrapped in a
``PreTrainedTokenizerFast`` (:attr:`Tokenizer.hf`), whatever it was loaded from:

* a Llama-2-format SentencePiece ``tokenizer.model`` (converted here, see :func:`sentencepiece_to_hf`),
* an HF ``tokenizer.json`` file or a directory holding one (any HF tokenizer directory),
* a directory written by :meth:`Tokenizer.save` (which is also such an HF directory).

Why HF ``tokenizers`` rather than ``sentencepiece`` for training: its ``tokenizer.json`` is what
``transformers.AutoTokenizer`` (and so lm-eval, peft, pipelines and the server) load directly, the same
object encodes in batches from Rust, and one runtime serves trained and converted tokenizers alike.
A SentencePiece model would need a conversion step on every load and a second code path for encoding.

Conventions of the tokenizers trained here (Llama's): ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256
byte-fallback pieces ``<0x00>``..``<0xFF>``, so any byte sequence is encodable and decoding is lossless. Text is
normalised the SentencePiece way: a ``▁`` is prepended and every space becomes ``▁``.

Imported tokenizers keep their own special-token conventions, read from their files (never guessed from a model
name), see :class:`Conventions`: whether plain text gets BOS (SmolLM2's ChatML tokenizer: no), which token separates
documents (``<|endoftext|>`` in the GPT-2 family, else EOS) and which tokens end generation (EOS plus the chat
template's end-of-turn token, such as ``<|im_end|>``, plus the checkpoint's ``generation_config.json`` ids).

One module per job (everything below is importable from ``mobillama.tokenizer`` itself):

- :mod:`~mobillama.tokenizer.core`: the :class:`Tokenizer` wrapper (ids, encode/decode, chat, save);
- :mod:`~mobillama.tokenizer.load`: :func:`load_tokenizer` (a ``tokenizer.model``, a ``tokenizer.json``,
  a directory);
- :mod:`~mobillama.tokenizer.special_tokens`: :class:`Conventions` (BOS, document separator, stop ids) and the
  helpers that apply them to any tokenizer (:func:`bos_prefix`, :func:`encode_prompt`, :func:`stop_ids`);
- :mod:`~mobillama.tokenizer.chat_template`: the MobiLlama-Chat template and template rendering;
- :mod:`~mobillama.tokenizer.llama_format`: Llama's token names, the HF file names, the Llama pipeline;
- :mod:`~mobillama.tokenizer.from_sentencepiece`: :func:`sentencepiece_to_hf`;
- :mod:`~mobillama.tokenizer.train`: :func:`train_tokenizer`.
"""

from mobillama.tokenizer.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    MOBILLAMA_CHAT_TEMPLATE,
    check_messages,
    is_mobillama_template,
    render_chat,
    render_template,
)
from mobillama.tokenizer.core import Tokenizer, plain_text_backend
from mobillama.tokenizer.from_sentencepiece import sentencepiece_to_hf
from mobillama.tokenizer.llama_format import (
    BOS,
    BYTE_TOKENS,
    CONFIG_FILE,
    EOS,
    GENERATION_CONFIG_FILE,
    METADATA_FILE,
    SP_MODEL_FILE,
    SPIECE_UNDERLINE,
    UNK,
)
from mobillama.tokenizer.load import load_tokenizer
from mobillama.tokenizer.special_tokens import (
    END_OF_TEXT,
    END_OF_TURN_TOKENS,
    Conventions,
    bos_prefix,
    conventions,
    derive_conventions,
    encode_prompt,
    read_add_bos_token,
    read_generation_stop_ids,
    special_token_ids,
    stop_ids,
)
from mobillama.tokenizer.train import new_bpe_backend, train_tokenizer

__all__ = [
    "BOS",
    "BYTE_TOKENS",
    "CONFIG_FILE",
    "DEFAULT_SYSTEM_PROMPT",
    "END_OF_TEXT",
    "END_OF_TURN_TOKENS",
    "EOS",
    "GENERATION_CONFIG_FILE",
    "METADATA_FILE",
    "MOBILLAMA_CHAT_TEMPLATE",
    "SPIECE_UNDERLINE",
    "SP_MODEL_FILE",
    "UNK",
    "Conventions",
    "Tokenizer",
    "bos_prefix",
    "check_messages",
    "conventions",
    "derive_conventions",
    "encode_prompt",
    "is_mobillama_template",
    "load_tokenizer",
    "new_bpe_backend",
    "plain_text_backend",
    "read_add_bos_token",
    "read_generation_stop_ids",
    "render_chat",
    "render_template",
    "sentencepiece_to_hf",
    "special_token_ids",
    "stop_ids",
    "train_tokenizer",
]
