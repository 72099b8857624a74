"""Interactive image chat: ``mobillama chat CKPT --image`` and :func:`mobillama.infer.chat.vision_chat_loop`
(history, /reset, /image, /exit, the context guard with image tokens) against ``chat_with_images``."""

from __future__ import annotations

import io

import pytest

from mobillama.cli import main
from mobillama.infer.chat import vision_chat_loop
from mobillama.infer.sampling import SamplingParams, cut_at_stop
from mobillama.vision.chat import chat_with_images, load_vision_chat

from .conftest import draw_shape, save_tiny_checkpoints

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("vchat")
    vision, text = save_tiny_checkpoints(root, tokenizer)
    draw_shape("red", "circle").save(root / "red.png")
    draw_shape("blue", "square").save(root / "blue.png")
    return vision, text, root


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return load_vision_chat(checkpoints[0], dtype="fp32")


def expected(loaded, messages, images) -> str:
    """What the chat should answer: the library call on the same conversation, cut at the chat stop."""
    model, tok, proc = loaded
    return cut_at_stop(
        chat_with_images(model, tok, proc, messages, images, max_new_tokens=4), ("### Human:",)
    )[0].strip()


def run(loaded, text: str, image=None):
    model, tok, proc = loaded
    out = io.StringIO()
    history = vision_chat_loop(model, tok, proc, PARAMS, io.StringIO(text), out, image=image)
    return history, out.getvalue()


def test_two_turns_keep_history_and_the_image(loaded, checkpoints):
    red = draw_shape("red", "circle")
    history, out = run(loaded, "what is it\nand the colour\n", image=red)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    first = expected(loaded, [{"role": "user", "content": "what is it"}], [red])
    assert history[1]["content"] == first
    second = expected(loaded, history[:3], [red])
    assert history[3]["content"] == second


def test_reset_image_switch_and_exit(loaded, checkpoints):
    _, _, root = checkpoints
    history, out = run(
        loaded,
        f"hello\n/reset\n/image {root / 'missing.png'}\n/image\n/image {root / 'blue.png'}\n"
        "what is it\n/what\n/exit\nnever sent\n",
        image=draw_shape("red", "circle"),
    )
    assert out.count("[conversation cleared]") == 1
    assert "image file not found" in out and "image unchanged" in out
    assert "[usage: /image PATH]" in out
    assert f"[image: {root / 'blue.png'}; conversation cleared]" in out
    assert "unknown command /what" in out
    assert [m["content"] for m in history if m["role"] == "user"] == ["what is it"]
    blue = draw_shape("blue", "square")
    assert history[1]["content"] == expected(loaded, history[:1], [blue])


def test_text_only_turns_without_an_image(loaded):
    history, _ = run(loaded, "hi there\n")
    assert history[1]["content"] == expected(loaded, history[:1], [])


class Writes(io.StringIO):
    """A stdout that also records each write (one per streamed delta)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_answers_stream_token_by_token(loaded):
    model, tok, proc = loaded
    out = Writes()
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    history = vision_chat_loop(
        model, tok, proc, params, io.StringIO("what is it\n"), out, image=draw_shape("red", "circle")
    )
    answer = history[1]["content"]
    first = out.writes.index(">>> ") + 1  # what follows the prompt: the reply's deltas, then a newline
    deltas = out.writes[first : out.writes.index("\n", first)]
    assert len(deltas) > 1 and "".join(deltas) == answer


def test_context_guard_counts_image_tokens(loaded):
    # context 256; the image is 16 tokens; each "a"/"b" is one token: two 120-token turns do not fit
    red = draw_shape("red", "circle")
    history, out = run(loaded, "a" * 120 + "\n" + "b" * 120 + "\n", image=red)
    assert "[context full: dropped the 2 oldest message(s)]" in out
    assert history[0]["content"] == "b" * 120
    # 235 text tokens fit alone but not with the image's 16
    history, out = run(loaded, "c" * 235 + "\n", image=red)
    assert "too long" in out and history == []
    history, out = run(loaded, "c" * 235 + "\n")
    assert "too long" not in out and len(history) == 2


def test_cli_chat_with_image(checkpoints, loaded, capsys, monkeypatch):
    vision, _, root = checkpoints
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it\n/reset\nwhat is it\n/exit\n"))
    args = ["chat", str(vision), "--image", str(root / "red.png"), "--max-new-tokens", "4"]
    assert main([*args, "--temperature", "0", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    answer = expected(loaded, [{"role": "user", "content": "what is it"}], [draw_shape("red", "circle")])
    replies = [line.removeprefix(">>> ") for line in out.splitlines()[1:] if line.startswith(">>> ")]
    assert replies[:3] == [answer, "[conversation cleared]", answer]


def test_cli_chat_bad_input(checkpoints, capsys, monkeypatch):
    vision, text, root = checkpoints
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    assert main(["chat", str(text), "--image", str(root / "red.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --image needs a MobiLlama-V checkpoint") and "\n" not in err
    assert main(["chat", str(vision), "--image", str(root / "missing.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: image file not found: {root / 'missing.png'}"
    assert main(["chat", str(vision), "--bits", "8"]) == 2
    assert "--bits: not supported for a MobiLlama-V checkpoint" in capsys.readouterr().err
    # a vision checkpoint without --image still chats
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(vision), "--max-new-tokens", "2", "--dtype", "fp32"]) == 0
