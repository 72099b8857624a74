"""Tokenizers: training with Llama conventions, loading every format, chat template, bad input.

The real Llama-2-format ``tokenizer.model`` is the 32k SentencePiece model shipped in the
``mistral-common==1.13.1`` wheel; the fixture downloads the wheel once with pip into a cache directory
(``$MOBILLAMA_TEST_ASSETS`` or ``~/.cache/mobillama/test-assets``) and skips only if PyPI is unreachable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mobillama.data.sources import PYDOC_TOPICS, SkipLog, Source, iter_documents, stdlib_dir
from mobillama.errors import MobiLlamaError
from mobillama.tokenizer import (
    BYTE_TOKENS,
    DEFAULT_SYSTEM_PROMPT,
    MOBILLAMA_CHAT_TEMPLATE,
    conventions,
    encode_prompt,
    load_tokenizer,
    train_tokenizer,
)

TOPICS = [
    t
    for _, t in iter_documents(Source(stdlib_dir() / "pydoc_data" / "topics.py", PYDOC_TOPICS), 0, SkipLog())
]
TRICKY = [
    "Hello world, ça va? 🤖",
    " leading space",
    "two  spaces and\ttab\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # 12345\n",
    "日本語のテキスト",
    "mixed 3.14159 digits 2024",
    "x\u200by zero width",
]
MISTRAL_WHEEL = "mistral_common-1.13.1-py3-none-any.whl"
MISTRAL_MODEL = "mistral_common/data/tokenizer.model.v1"
# What pip prints when it cannot reach an index at all; any other failure (a pinned version missing from
# the configured index, a broken pip) fails the test instead of skipping it.
OFFLINE_MARKERS = (
    "NewConnectionError",
    "NameResolutionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(TOPICS[:60], 400, out, progress=False), out


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("MOBILLAMA_TEST_ASSETS", "~/.cache/mobillama/test-assets")).expanduser()
    model = cache / "tokenizer.model.v1"
    if not model.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        wheel = cache / MISTRAL_WHEEL
        if not wheel.is_file():
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "mistral-common==1.13.1",
                "-d",
                str(cache),
            ]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode != 0 or not wheel.is_file():
                tail = result.stderr.strip()[-300:]
                if any(marker in result.stderr for marker in OFFLINE_MARKERS):
                    pytest.skip(
                        f"no network, cannot fetch mistral-common (put {MISTRAL_WHEEL} in {cache}): {tail}"
                    )
                pytest.fail(f"pip download of mistral-common==1.13.1 failed, not for lack of network: {tail}")
        with zipfile.ZipFile(wheel) as z:
            model.write_bytes(z.read(MISTRAL_MODEL))
    # the loader expects the usual file name when given a directory
    d = tmp_path_factory.mktemp("spm")
    (d / "tokenizer.model").write_bytes(model.read_bytes())
    return d / "tokenizer.model"


# ---- training ------------------------------------------------------------------------------------------
def test_trained_tokenizer_follows_llama_conventions(trained):
    tok, _ = trained
    vocab = tok.hf.get_vocab()
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert [vocab[b] for b in BYTE_TOKENS] == list(range(3, 259))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 0, 400)
    assert tok.encode("hi", add_bos=True, add_eos=True)[0] == 1 and tok.encode("hi", add_eos=True)[-1] == 2


def test_trained_tokenizer_is_lossless_with_byte_fallback(trained):
    tok, _ = trained
    for text in TRICKY + TOPICS[60:63]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("🤖")  # never seen in training: falls back to its 4 UTF-8 bytes
    assert ids[-4:] == [3 + b for b in "🤖".encode()]
    assert tok.encode("<0x41>", parse_special=False) != [3 + 0x41]  # byte pieces are not text-addressable
    assert tok.encode_batch(TRICKY[:3]) == [tok.encode(t) for t in TRICKY[:3]]


def test_training_is_deterministic_and_saved_dir_round_trips(trained, tmp_path):
    tok, out = trained
    again = train_tokenizer(TOPICS[:60], 400, None, progress=False)
    assert again.sha256 == tok.sha256
    loaded = load_tokenizer(out)
    assert loaded.sha256 == tok.sha256 and loaded.vocab_size == 400
    assert loaded.encode(TOPICS[70]) == tok.encode(TOPICS[70])
    meta = json.loads((out / "mobillama_tokenizer.json").read_text())
    assert meta["sha256"] == tok.sha256 and meta["training"]["trained_on"]["documents"] == 60
    assert load_tokenizer(out / "tokenizer.json").encode(TOPICS[70]) == tok.encode(TOPICS[70])


def test_auto_tokenizer_loads_the_saved_directory_with_the_same_ids(trained):
    from transformers import AutoTokenizer

    tok, out = trained
    auto = AutoTokenizer.from_pretrained(str(out))
    for text in TRICKY:
        assert auto(text).input_ids == tok.encode(text, add_bos=True)
        assert auto.decode(auto(text).input_ids, skip_special_tokens=True) == text


def test_training_bad_input(tmp_path):
    with pytest.raises(MobiLlamaError, match="--vocab-size 100 is too small"):
        train_tokenizer(["abc"], 100, None, progress=False)
    with pytest.raises(MobiLlamaError, match="no training text"):
        train_tokenizer([], 300, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


# ---- chat template --------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_default_chat_template_renders_the_mobillama_chat_format(trained):
    from transformers import AutoTokenizer

    tok, out = trained
    expected = (
        DEFAULT_SYSTEM_PROMPT
        + "\n### Human: What is 2+2?\n### Assistant: 4.</s>\n### Human: And 3+3?\n### Assistant:"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected.removesuffix(
        "\n### Assistant:"
    )
    custom = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]])
    assert custom == "Be brief.\n### Human: What is 2+2?\n### Assistant:"
    auto = AutoTokenizer.from_pretrained(str(out))  # transformers renders the identical string
    assert auto.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == expected
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == MOBILLAMA_CHAT_TEMPLATE
    ids = tok.encode(expected)
    assert ids.count(tok.eos_id) == 1  # the reply's </s> is the EOS id when rendering prompts


def test_a_tokenizers_own_template_wins(trained, tmp_path):
    tok, out = trained
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (tmp_path / "own" / "tokenizer_config.json").write_text(json.dumps(config))
    own = load_tokenizer(tmp_path / "own")
    assert own.apply_chat_template(CONVERSATION[:1]) == "<user>What is 2+2?"


def test_malformed_conversations_are_clear_errors(trained):
    tok, _ = trained
    for messages, msg in [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only come first"),
        ([{"role": "user", "content": 5}], "must be a string"),
    ]:
        with pytest.raises(MobiLlamaError, match=msg):
            tok.apply_chat_template(messages)


# ---- loading ------------------------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_model_matches_sentencepiece_itself(sp_model_path):
    import sentencepiece as spm

    tok = load_tokenizer(sp_model_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    assert tok.vocab_size == sp.vocab_size() == 32000
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    for text in TRICKY + TOPICS[:40]:
        assert tok.encode(text) == sp.encode(text), text[:60]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text
    # SentencePiece reads "</s>" in text as characters; so does encode(parse_special=False) ...
    assert tok.encode("<s> literal </s> markup", parse_special=False) == sp.encode("<s> literal </s> markup")
    # ... while prompts (parse_special=True) get the EOS id, and, as in Llama-2's HF tokenizer, the text
    # after a special token starts a new piece with its own "▁"
    assert tok.encode("a</s>b") == [*tok.encode("a"), 2, *tok.encode("b")]
    assert tok.decode(tok.encode("a</s>b")) == "a</s> b"


def test_sentencepiece_tokenizer_saves_to_an_auto_tokenizer_directory(sp_model_path, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(sp_model_path)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert auto(TRICKY[0]).input_ids == tok.encode(TRICKY[0], add_bos=True)
    assert tok.add_bos and tok.encode_prompt(TRICKY[0]) == auto(TRICKY[0]).input_ids
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.sha256 == tok.sha256
    only_model = tmp_path / "only"
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    assert load_tokenizer(only_model).sha256 == tok.sha256


def test_loading_bad_tokenizer_paths_is_a_clear_error(tmp_path):
    with pytest.raises(MobiLlamaError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(MobiLlamaError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MobiLlamaError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "garbage.model").write_bytes(os.urandom(64))
    with pytest.raises(MobiLlamaError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "garbage.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(MobiLlamaError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "empty.model")


def test_a_tokenizer_without_bos_and_eos_is_usable_but_cannot_separate_documents(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from mobillama.data.prepare import prepare_corpus

    backend = Backend(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (None, None, 3)
    assert tok.encode("a b c") == [0, 1, 2]
    with pytest.raises(MobiLlamaError, match="has no EOS token"):
        tok.encode("a", add_eos=True)
    (tmp_path / "in.txt").write_text("a b " * 100)
    with pytest.raises(MobiLlamaError, match="token to separate documents"):
        prepare_corpus([tmp_path / "in.txt"], tmp_path / "tokenizer.json", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- special-token conventions: the project's (Llama) and SmolLM2's (GPT-2 byte level, ChatML) ---------------
def test_a_project_tokenizer_puts_bos_before_prompts_once_and_stops_at_eos(trained):
    tok, _ = trained
    assert tok.add_bos and tok.end_of_text_id == tok.eos_id == 2 and tok.stop_ids == (2,)
    assert tok.encode_prompt("hello") == [1, *tok.encode("hello")]
    assert tok.encode_prompt("<s>hello") == tok.encode("<s>hello")  # already there: not a second one
    assert tok.uses_mobillama_chat
    prompt = tok.encode_prompt(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert prompt[0] == 1 and prompt.count(1) == 1


def test_a_template_that_writes_bos_itself_gets_no_second_bos(trained):
    tok, out = trained
    llama2 = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    again = load_tokenizer(out)
    again.hf.chat_template = llama2
    ids = again.encode_prompt(again.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert ids[0] == 1 and ids.count(1) == 1 and not again.uses_mobillama_chat


def test_a_smollm2_style_tokenizer_adds_no_bos_and_separates_with_endoftext(smol_tokenizer_dir):
    tok = load_tokenizer(smol_tokenizer_dir)
    assert (tok.bos_id, tok.eos_id, tok.end_of_text_id) == (1, 2, 0)
    assert not tok.add_bos and not tok.uses_mobillama_chat
    assert tok.stop_ids == (2, 0)  # <|im_end|> (EOS and end of turn), <|endoftext|> (end of a document)
    assert tok.encode_prompt("hello world") == tok.encode("hello world")
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_prompt(text)
    assert ids[0] == 1 and ids[1] != 1 and ids.count(1) == 3  # one <|im_start|> per turn, none doubled
    # a bare transformers tokenizer of the same directory gets the same rules (the vision and eval code)
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(smol_tokenizer_dir))
    assert conventions(auto) == tok.conventions and encode_prompt(auto, text) == ids


def test_the_convention_survives_save_and_the_post_processor_decides_without_a_config(
    smol_tokenizer_dir, tmp_path
):
    tok = load_tokenizer(smol_tokenizer_dir)
    tok.save(tmp_path / "saved")  # transformers drops add_bos_token when saving; save() writes it back
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and not load_tokenizer(tmp_path / "saved").add_bos
    # no config field: a ByteLevel post-processor adds no BOS, Llama's TemplateProcessing does
    assert not load_tokenizer(smol_tokenizer_dir / "tokenizer.json").add_bos
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    backend = Backend.from_file(str(smol_tokenizer_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "with_bos.json"))
    with_bos = load_tokenizer(tmp_path / "with_bos.json")
    with_bos.hf.bos_token = "<|im_start|>"
    from mobillama.tokenizer import derive_conventions

    assert derive_conventions(with_bos.hf).add_bos


def test_generation_config_eos_ids_are_stop_ids(smol_tokenizer_dir, tmp_path):
    import shutil

    shutil.copytree(smol_tokenizer_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5, 99999]}))
    assert load_tokenizer(tmp_path / "ckpt").stop_ids == (2, 0, 5)  # ids outside the vocabulary are dropped
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(tmp_path / "ckpt").stop_ids == (2, 0, 7)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('Conversation roles must alternate user/assistant') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m['content'] }", "chat template"),
        ("{{ messages[5]['content'] + 1 }}", "chat template"),
    ],
)
def test_a_template_that_fails_is_one_line_error(smol_tokenizer_dir, template, message):
    tok = load_tokenizer(smol_tokenizer_dir)
    tok.hf.chat_template = template
    with pytest.raises(MobiLlamaError, match=message) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value) and str(e.value).startswith("the chat template failed")
