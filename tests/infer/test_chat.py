"""The chat loop fed from a string: streaming replies, history, /reset, /exit, and the context guard."""

from __future__ import annotations

import io

from mobillama.infer.chat import chat_loop, fit_history
from mobillama.infer.generator import Generator
from mobillama.infer.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=6, stop_at_eos=False)


def run(generator, text: str, params=PARAMS):
    out = io.StringIO()
    history = chat_loop(generator, params, io.StringIO(text), out)
    return history, out.getvalue()


def test_history_accumulates_and_reply_is_streamed(byte_model, byte_tokenizer):
    gen = Generator(byte_model(max_position_embeddings=256), byte_tokenizer)
    history, out = run(gen, "hi\nhow are you\n")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "how are you"
    # the second prompt carried the first exchange (same text the model saw)
    first_reply = history[1]["content"]
    assert first_reply in out


def test_reset_exit_and_unknown_commands(byte_model, byte_tokenizer):
    gen = Generator(byte_model(max_position_embeddings=256), byte_tokenizer)
    history, out = run(gen, "hello\n/reset\n/what\n\nagain\n/exit\nnever sent\n")
    assert "[conversation cleared]" in out
    assert "unknown command /what" in out
    assert [m["content"] for m in history if m["role"] == "user"] == ["again"]


def test_oldest_turns_are_dropped_with_a_notice(byte_model, byte_tokenizer):
    # context 256 bytes; the system line alone is ~160 bytes, so the second long turn forces a drop
    gen = Generator(byte_model(max_position_embeddings=256), byte_tokenizer)
    history, out = run(gen, "a" * 30 + "\n" + "b" * 30 + "\n")
    assert "[context full: dropped the 2 oldest message(s)]" in out
    assert history[0]["content"] == "b" * 30


def test_message_too_long_is_not_sent(byte_model, byte_tokenizer):
    gen = Generator(byte_model(max_position_embeddings=256), byte_tokenizer)
    history, out = run(gen, "x" * 300 + "\n")
    assert "too long" in out
    assert history == []


def test_fit_history_keeps_everything_that_fits(byte_model, byte_tokenizer):
    gen = Generator(byte_model(max_position_embeddings=256), byte_tokenizer)
    history = [{"role": "user", "content": "q"}]
    ids, dropped = fit_history(gen, history, None, room=8)
    assert dropped == 0
    assert byte_tokenizer.decode(ids).endswith("### Human: q\n### Assistant:")
    assert ids[0] == byte_tokenizer.bos_id
