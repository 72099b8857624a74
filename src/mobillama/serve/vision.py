"""Serving a MobiLlama-V checkpoint: the generator the engine runs, and image URLs to Pillow images.

:class:`VisionGenerator` has the interface the engine and the HTTP layer use for a text model
(``tokenizer``, ``context``, ``iter_ids``, ``sibling``) plus ``accepts_images`` and the image steps, so
image requests wait in the same queue, under the same concurrency limit, as every other request. Its
``iter_ids`` runs the project's one generation loop (:class:`~mobillama.infer.generator.Generator` over
the vision model's decoder, fed the prompt's embeddings), so an answer streams token by token, stop
strings are matched as for text, and a cancelled job (client gone, shutdown) stops at its next token.
``repetition_penalty`` is refused by the HTTP layer.

Image URLs (:func:`read_image_url`): ``data:image/...;base64,...``, and local files (``file://`` URLs or
absolute paths) only when the server was given an image directory (``--image-dir``) and only files whose
real path (symlinks resolved) lies inside it: otherwise any client, or any web page able to reach the
server, could read image files anywhere the server's user can. Errors about local paths never say whether
a path exists, where it points or how large it is. Remote URLs are refused: the server never fetches.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Generator as PyGenerator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator
from mobillama.infer.load import load_checkpoint_tokenizer
from mobillama.infer.sampling import Completion, SamplingParams
from mobillama.vision.chat import image_prompt_ids, load_vision_chat, prompt_length, stream_answer
from mobillama.vision.data import decode_image

MAX_IMAGE_BYTES = 20_000_000  # largest image file (decoded data URL or local file) a request may send
MAX_IMAGE_PIXELS = 40_000_000  # largest image by its header (a small PNG can expand to gigabytes)
MAX_IMAGES_PER_REQUEST = 4


class VisionGenerator:
    """A MobiLlama-V model behind the engine; each worker slot has its own (:meth:`sibling`: same
    weights, its own KV cache)."""

    accepts_images = True

    def __init__(self, model: Any, hf_tokenizer: Any, processor: Any, tokenizer: Any) -> None:
        self.model = model
        self.hf = hf_tokenizer  # renders and tokenizes chat prompts with <image> placeholders
        self.processor = processor
        self.tokenizer = tokenizer  # the project tokenizer interface, for /v1/completions
        self.context = model.config.max_position_embeddings
        self.generator = Generator(model.decoder, hf_tokenizer)

    @classmethod
    def load(cls, checkpoint: str | Path, dtype: str = "bf16") -> VisionGenerator:
        model, hf, processor = load_vision_chat(checkpoint, dtype=dtype)
        return cls(model, hf, processor, load_checkpoint_tokenizer(checkpoint))

    def sibling(self) -> VisionGenerator:
        return type(self)(self.model, self.hf, self.processor, self.tokenizer)

    def chat_prompt(self, messages: list[dict[str, str]], n_images: int) -> tuple[list[int], int]:
        """(prompt ids with one placeholder id per image, positions the decoder sees)."""
        ids = image_prompt_ids(self.hf, messages, n_images)
        return ids, prompt_length(self.model, ids)

    def iter_ids(
        self, prompt_ids: list[list[int]], params: SamplingParams, images: list | None = None
    ) -> PyGenerator[tuple[int, str], None, list[Completion]]:
        """The answer's text deltas token by token (stripped), then (on return) its :class:`Completion`."""
        ids = prompt_ids[0]
        length = prompt_length(self.model, ids)
        if length >= self.context:
            raise MobiLlamaError(f"the prompt has {length} tokens; the model's context is {self.context}")
        stream = stream_answer(self.generator, self.model, self.processor, ids, list(images or []), params)
        return (yield from stream)


NO_LOCAL_PATHS = "local image paths are not enabled on this server (send a data: URL)"
NOT_ALLOWED = "image not found or not allowed"


def read_image_url(
    url: str,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    image_dir: str | os.PathLike | None = None,
):
    """An RGB Pillow image from an OpenAI ``image_url.url``; bad input is a one-line MobiLlamaError.

    A local path (``file://`` or absolute) is read only when ``image_dir`` is given and the path's real
    location is inside it; every refusal of an existing or missing path is the same message.
    """
    too_big = f"the image is larger than the limit of {max_bytes} bytes"
    if url[:5].lower() == "data:":
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise MobiLlamaError("malformed data URL: no ',' between the media type and the data")
        media, *options = header.split(";")
        if not media.lower().startswith("image/"):
            raise MobiLlamaError(f"data URL media type {media or '(none)'!r} is not an image type")
        if [o.lower() for o in options][-1:] != ["base64"]:
            raise MobiLlamaError("only base64 data URLs are accepted (data:image/png;base64,...)")
        if len(payload) > (max_bytes // 3 + 1) * 4:  # refuse before decoding anything
            raise MobiLlamaError(too_big)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MobiLlamaError("the data URL's payload is not valid base64") from None
        if len(data) > max_bytes:
            raise MobiLlamaError(too_big)
        return decode_image(data, "", "the data URL's image", max_pixels=max_pixels)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise MobiLlamaError("remote image URLs are not fetched; send a data: URL")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise MobiLlamaError("a file: URL must name this machine (file:///path)")
        path = unquote(parts.path)
    elif url.startswith("/"):
        path = url
    elif scheme:
        raise MobiLlamaError(f"unsupported image URL scheme {scheme[:20]!r} (use data:)")
    else:
        raise MobiLlamaError("an image path must be absolute")
    if image_dir is None:
        raise MobiLlamaError(NO_LOCAL_PATHS)
    data = _read_inside(path, image_dir, max_bytes)
    return decode_image(data, "", "the image file", max_pixels=max_pixels)


def _read_inside(path: str, image_dir: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` if its real path is inside ``image_dir``; any other case
    (missing, outside, a symlink out, a directory, unreadable) is the one message :data:`NOT_ALLOWED`.
    The file is opened once by its resolved path and checked through that descriptor."""
    too_big = f"the image is larger than the limit of {max_bytes} bytes"
    try:
        root = os.path.realpath(image_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise MobiLlamaError(NOT_ALLOWED)
        # O_NOFOLLOW: the real path has no link left, so a link put there since is refused;
        # O_NONBLOCK: a FIFO cannot hold the open.
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise MobiLlamaError(NOT_ALLOWED)
            if info.st_size > max_bytes:
                raise MobiLlamaError(too_big)
            data = f.read(max_bytes + 1)
    except MobiLlamaError:
        raise
    except (OSError, ValueError):  # missing, no permission, a NUL in the path, another drive
        raise MobiLlamaError(NOT_ALLOWED) from None
    if len(data) > max_bytes:  # it grew since fstat
        raise MobiLlamaError(too_big)
    return data


__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGES_PER_REQUEST", "VisionGenerator", "read_image_url"]
