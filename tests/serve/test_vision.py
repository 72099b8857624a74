"""Serving a MobiLlama-V checkpoint: image_url content parts (data URLs, and local paths inside the
server's image directory) answered as ``chat_with_images`` answers them, through the engine's queue and streamed token by token; bad
images are one-line 400s and the server keeps serving; a text-only model refuses images. Local paths
refused by default or outside the directory: tests/serve/test_security.py."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest

from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import drain
from mobillama.infer.sampling import SamplingParams, cut_at_stop
from mobillama.serve.server import load_generator
from mobillama.serve.vision import read_image_url
from mobillama.vision.chat import chat_with_images, load_vision_chat

from ..vision.conftest import build_tokenizer, draw_shape, save_tiny_checkpoints
from .conftest import live, wait_until

CHAT = "/v1/chat/completions"
MAX_IMAGE_BYTES = 50_000
QUESTION = "what is it"


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_message(url, text: str = QUESTION) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts}


def ask(server, messages, **extra) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(server.url + CHAT, json=body, timeout=60)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vserve")
    vision, text = save_tiny_checkpoints(root, build_tokenizer())
    images = root / "images"  # the server's --image-dir
    images.mkdir()
    draw_shape("red", "circle").save(images / "red.png")
    return vision, text, images


@pytest.fixture(scope="module")
def direct(checkpoints):
    return load_vision_chat(checkpoints[0], dtype="fp32")


@pytest.fixture(scope="module")
def server(checkpoints):
    generator = load_generator(checkpoints[0], dtype="fp32")
    with live(generator, max_image_bytes=MAX_IMAGE_BYTES, image_dir=str(checkpoints[2])) as s:
        yield s


def expected(direct, messages, images) -> str:
    model, tok, proc = direct
    answer = chat_with_images(model, tok, proc, messages, images, max_new_tokens=4)
    return cut_at_stop(answer, ("### Human:",))[0].strip()


def test_data_url_and_paths_answer_like_chat_with_images(server, checkpoints, direct):
    _, _, root = checkpoints
    path = root / "red.png"
    want = expected(direct, [{"role": "user", "content": QUESTION}], [path])
    for url in (data_url(path.read_bytes()), f"file://{path}", str(path)):
        r = ask(server, [image_message(url)])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want
        # usage counts the image's 16 tokens
        model, tok, _ = direct
        from mobillama.vision.chat import image_prompt_ids, prompt_length

        ids = image_prompt_ids(tok, [{"role": "user", "content": QUESTION}], 1)
        assert body["usage"]["prompt_tokens"] == prompt_length(model, ids) == len(ids) + 15


def test_history_and_text_only_turns(server, checkpoints, direct):
    _, _, root = checkpoints
    path = root / "red.png"
    history = [
        image_message(str(path)),
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and the colour"},
    ]
    plain = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and the colour"},
    ]
    r = ask(server, history)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected(direct, plain, [path])
    r = ask(server, [{"role": "user", "content": "hi"}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected(
        direct, [{"role": "user", "content": "hi"}], []
    )


def test_stream_arrives_token_by_token_then_done(server, checkpoints, direct):
    path = checkpoints[2] / "red.png"
    want = expected(direct, [{"role": "user", "content": QUESTION}], [path])
    body = {"messages": [image_message(str(path))], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [x.removeprefix("data: ") for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == want
    # the answer streams through the text models' generation loop: several content chunks, not one
    assert len([p for p in pieces if p]) > 1, pieces
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_vision_generator_streams_each_token(checkpoints):
    generator = load_generator(checkpoints[0], dtype="fp32")
    ids, length = generator.chat_prompt([{"role": "user", "content": QUESTION}], 1)
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    deltas: list[str] = []
    completion = drain(
        generator.iter_ids([ids], params, [draw_shape("red", "circle")]), lambda _, d: deltas.append(d)
    )[0]
    assert len(deltas) > 1 and "".join(deltas) == completion.text
    assert completion.completion_tokens == 8 and completion.prompt_tokens == length
    # each worker slot gets a generator with its own cache over the same weights
    other = generator.sibling()
    assert other.model is generator.model and other.generator.decoder is not generator.generator.decoder


def test_models_and_ready_say_images_are_accepted(server):
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["accepts_images"] is True
    assert httpx.get(server.url + "/ready").json()["accepts_images"] is True


def test_plain_completions_work_on_a_vision_model(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "a red", "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def _deep_png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("I;16", (8, 8)))


def _bad_cases(root):
    good = data_url(png_bytes(draw_shape("red", "circle")))
    big = data_url(b"\0" * (MAX_IMAGE_BYTES + 10))
    part = {"type": "image_url", "image_url": {"url": good}}
    return [
        # (id, messages, substring of the error message)
        ("no-comma", [image_message("data:image/png;base64")], "malformed data URL"),
        ("bad-base64", [image_message("data:image/png;base64,@@@not-base64")], "not valid base64"),
        ("not-base64-url", [image_message("data:image/png,rawbytes")], "only base64 data URLs"),
        ("not-image-media", [image_message(data_url(b"hello", "text/plain"))], "not an image type"),
        ("not-an-image", [image_message(data_url(b"hello world"))], "not a recognised image format"),
        ("unsupported-mode", [image_message(data_url(_deep_png()))], "unsupported mode 'I;16'"),
        ("missing-file", [image_message(str(root / "missing.png"))], "image not found or not allowed"),
        ("missing-file-url", [image_message(f"file://{root}/missing.png")], "image not found or not allowed"),
        ("relative-path", [image_message("red.png")], "must be absolute"),
        ("huge-data-url", [image_message(big)], f"larger than the limit of {MAX_IMAGE_BYTES} bytes"),
        ("remote-url", [image_message("https://example.com/cat.png")], "remote image URLs are not fetched"),
        ("other-scheme", [image_message("ftp2://host/cat.png")], "unsupported image URL scheme"),
        (
            "unknown-part-type",
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}],
            "does not match any of the expected tags",
        ),
        ("url-wrong-type", [image_message(5)], "image_url.url: Input should be a valid string"),
        (
            "url-missing",
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "Field required",
        ),
        (
            "image-in-assistant-turn",
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [part]},
                {"role": "user", "content": "so?"},
            ],
            "user messages only",
        ),
        ("placeholder-in-text", [image_message(good, text="<image> what")], "send images as image_url"),
        ("too-many-images", [{"role": "user", "content": [part] * 5}], "at most 4 are accepted"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_images_are_400_and_the_server_keeps_serving(server, checkpoints, case):
    cases = _bad_cases(checkpoints[2])
    assert len(cases) == 18
    name, messages, fragment = cases[case]
    r = ask(server, messages)
    assert r.status_code == 400, (name, r.text)
    message = r.json()["error"]["message"]
    assert fragment in message and "\n" not in message, (name, message)
    good = ask(server, [image_message(str(checkpoints[2] / "red.png"))])
    assert good.status_code == 200, good.text


def test_repetition_penalty_is_refused(server, checkpoints):
    r = ask(server, [image_message(str(checkpoints[2] / "red.png"))], repetition_penalty=1.3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"


def test_context_guard_counts_the_image(server, checkpoints):
    # 247 prompt tokens without the image: 4 new tokens fit; the image's 15 extra positions do not
    long = "c" * 235
    r = ask(server, [{"role": "user", "content": long}])
    assert r.status_code == 200, r.text
    r = ask(server, [image_message(str(checkpoints[2] / "red.png"), text=long)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_image_requests_share_the_queue_limits(checkpoints):
    generator = load_generator(checkpoints[0], dtype="fp32")
    gate = threading.Event()
    inner = generator.iter_ids

    def gated(prompt_ids, params, images=None):
        gate.wait(30)
        return (yield from inner(prompt_ids, params, images))

    generator.iter_ids = gated
    messages = [image_message(str(checkpoints[2] / "red.png"))]
    with live(generator, max_concurrency=1, queue_size=0, image_dir=str(checkpoints[2])) as s:
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(ask(s, messages)))
        t.start()
        try:
            assert wait_until(lambda: s.app.state.engine.in_flight == 1)
            busy = ask(s, messages)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        finally:
            gate.set()
            t.join(60)
        assert first[0].status_code == 200
        assert ask(s, messages).status_code == 200


def test_text_model_refuses_images(checkpoints):
    _, text, root = checkpoints
    with live(load_generator(text, dtype="fp32")) as s:
        r = ask(s, [image_message(str(root / "red.png"))])
        assert r.status_code == 400
        error = r.json()["error"]
        assert "does not accept images" in error["message"] and error["code"] == "images_not_supported"
        assert error["param"] == "messages.0.content.1"
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["accepts_images"] is False
        assert ask(s, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]).status_code == 200


def test_read_image_url_pixel_cap(checkpoints):
    url = data_url(png_bytes(draw_shape("red", "circle")))
    assert read_image_url(url).size == (32, 32)
    with pytest.raises(MobiLlamaError, match="32x32 pixels, more than the limit of 100"):
        read_image_url(url, max_pixels=100)


def test_serve_cli_options_for_a_vision_checkpoint(checkpoints, monkeypatch):
    from mobillama.cli import main

    seen = {}
    monkeypatch.setattr(
        "mobillama.serve.server.run_server", lambda loader, settings, **kw: seen.update(settings=settings)
    )
    vision, text, _ = checkpoints
    assert main(["serve", str(vision), "--max-image-bytes", "3000000"]) == 0
    # room for one largest image as base64 besides the usual body limit
    assert seen["settings"].max_body_bytes == 1_000_000 + 4_000_000
    assert seen["settings"].max_image_bytes == 3_000_000
    assert main(["serve", str(text)]) == 0
    assert seen["settings"].max_body_bytes == 1_000_000
    with pytest.raises(MobiLlamaError, match="--bits: not supported for a MobiLlama-V checkpoint"):
        load_generator(vision, dtype="fp32", bits=8)


# ---- local image paths: opt-in, inside --image-dir only, errors that reveal nothing about the host ----
def _refusal(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image"
    return error["message"]


def test_local_paths_are_refused_by_default(checkpoints):
    generator = load_generator(checkpoints[0], dtype="fp32")
    path = checkpoints[2] / "red.png"
    with live(generator) as s:  # no image_dir
        for url in (str(path), f"file://{path}", str(checkpoints[2] / "missing.png"), "/etc/passwd"):
            message = _refusal(ask(s, [image_message(url)]))
            assert "local image paths are not enabled on this server" in message
            assert str(checkpoints[2]) not in message and "/etc" not in message
        good = ask(s, [image_message(data_url(path.read_bytes()))])  # data: URLs keep working
        assert good.status_code == 200, good.text


def test_paths_outside_the_image_dir_are_refused_alike(server, checkpoints, tmp_path):
    images = checkpoints[2]
    outside = tmp_path / "secret.png"
    draw_shape("blue", "square").save(outside)
    (images / "escape.png").unlink(missing_ok=True)
    (images / "escape.png").symlink_to(outside)  # a link inside the directory to a file outside it
    (images / "sub").mkdir(exist_ok=True)
    urls = [
        str(outside),  # exists, outside
        str(tmp_path / "missing.png"),  # missing, outside
        str(images / "missing.png"),  # missing, inside
        str(images / "escape.png"),  # symlink escaping the directory
        f"file://{images}/../{outside.parent.name}/secret.png",
        f"{images}/../../{images.parent.name}/{images.name}/../images.png",
        str(images / "sub"),  # a directory, not a file
        str(images) + "/red.png\x00.txt",  # NUL byte
        f"file://{images}/red%00.png",
        "/etc/passwd",
        "/",
    ]
    messages = {_refusal(ask(server, [image_message(url)])) for url in urls}
    assert messages == {"messages.0.content.1.image_url.url: image not found or not allowed"}
    # ... while a path inside it, and a symlink that stays inside it, work
    (images / "inner-link.png").unlink(missing_ok=True)
    (images / "inner-link.png").symlink_to(images / "red.png")
    for url in (str(images / "red.png"), f"file://{images}/sub/../red.png", str(images / "inner-link.png")):
        r = ask(server, [image_message(url)])
        assert r.status_code == 200, (url, r.text)


def test_image_file_errors_name_no_path(server, checkpoints):
    images = checkpoints[2]
    (images / "not-an-image.png").write_bytes(b"hello")
    (images / "big.png").write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    for name, fragment in [
        ("not-an-image.png", "cannot read the image file (not a recognised image format)"),
        ("big.png", f"larger than the limit of {MAX_IMAGE_BYTES} bytes"),
    ]:
        message = _refusal(ask(server, [image_message(str(images / name))]))
        assert fragment in message and str(images) not in message and name not in message, message
