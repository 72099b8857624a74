"""Image chat: the library entry points the chat CLI and the server call for a vision checkpoint.

The steps are separate so the chat loop and the server can check a prompt's length (image tokens
included) before generating: :func:`image_prompt_ids` renders and tokenizes, :func:`prompt_length`
counts what the decoder will see, :func:`stream_answer` runs the project's one generation loop
(:class:`~mobillama.infer.generator.Generator`, so an answer streams token by token) and
:func:`generate_from_ids` collects a whole answer. :func:`chat_with_images` chains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mobillama.config import parse_dtype
from mobillama.errors import MobiLlamaError
from mobillama.infer.generator import Generator, Stream, drain, strip_stream
from mobillama.infer.load import INFERENCE_DTYPES
from mobillama.infer.sampling import SamplingParams
from mobillama.tokenizer import bos_prefix, render_chat, render_template
from mobillama.vision.config import IMAGE_PLACEHOLDER
from mobillama.vision.data import load_image, tokenize_with_placeholders
from mobillama.vision.encoder import build_image_processor
from mobillama.vision.model import MobiLlamaV


def load_vision_chat(checkpoint: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """(model, tokenizer, image processor) of a MobiLlama-V checkpoint directory.

    ``dtype`` ("fp32", "bf16" or a torch dtype) casts the whole model; None keeps the stored fp32.
    """
    from transformers import AutoTokenizer

    model = MobiLlamaV.from_pretrained(checkpoint, device=device)
    if dtype is not None:
        model = model.to(parse_dtype(dtype, INFERENCE_DTYPES))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MobiLlamaError(f"{checkpoint}: no usable tokenizer files ({str(e).splitlines()[0]})") from None
    return model, tokenizer, build_image_processor(model.vision_config)


def render_image_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text with the tokenizer's chat template (MobiLlama-Chat's format when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return render_template(getattr(tokenizer, "hf", tokenizer), messages, add_generation_prompt=True)
    return render_chat(messages, add_generation_prompt=True)


def attach_placeholders(messages: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """``messages`` with the ``<image>`` placeholders in place: as given when they are already there
    (one per image), else all at the start of the first user turn (LLaVA's ``<image>\\n`` + question)."""
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_images and placeholders == 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise MobiLlamaError("an image needs a user message to attach to")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = (
            IMAGE_PLACEHOLDER * n_images + "\n" + messages[first_user]["content"]
        )
    elif placeholders != n_images:
        raise MobiLlamaError(
            f"the messages have {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)"
        )
    return messages


def image_prompt_ids(tokenizer, messages: list[dict[str, str]], n_images: int) -> list[int]:
    """Prompt token ids (BOS first where the tokenizer adds it, never twice), one image-placeholder id per
    image."""
    messages = attach_placeholders(messages, n_images)
    text = render_image_prompt(tokenizer, messages)
    ids, _ = tokenize_with_placeholders(tokenizer, text)
    return bos_prefix(tokenizer, text) + ids


def prompt_length(model: MobiLlamaV, ids: list[int]) -> int:
    """Positions the decoder sees for ``ids``: each image placeholder becomes the image's N tokens."""
    n_images = sum(1 for t in ids if t == model.vision_config.image_token_id)
    return len(ids) + n_images * (model.num_image_tokens - 1)


@dataclass
class ImageAnswer:
    """One generation: the decoded text, the new token ids, and whether it ended on a stop token."""

    text: str
    token_ids: list[int]
    hit_eos: bool


def stream_answer(
    generator: Generator, model: MobiLlamaV, processor, ids: list[int], images: list, params: SamplingParams
) -> Stream:
    """Stream the answer to prompt ``ids`` (from :func:`image_prompt_ids`) with ``images`` (Pillow images)
    through ``generator`` (a :class:`Generator` over ``model.decoder`` and the tokenizer): ``(0, delta)``
    token by token, stripped of surrounding whitespace, ending at the tokenizer's stop tokens (EOS, a
    chat template's end of turn; not shown) or a stop string of ``params``; returns the completion."""
    device = next(model.parameters()).device
    pixels = None
    if images:
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device)
    embeds, lengths = model.prompt_embeds(torch.tensor([ids], device=device), pixels)
    return strip_stream(generator.iter_embeds(embeds, lengths, params, seen_ids=[ids]))


def generate_from_ids(
    model: MobiLlamaV,
    tokenizer,
    processor,
    ids: list[int],
    images: list,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> ImageAnswer:
    """The whole answer of :func:`stream_answer` (its token ids end with the stop token, if one ended it)."""
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    generator = Generator(model.decoder, tokenizer)
    completion = drain(stream_answer(generator, model, processor, ids, images, params))[0]
    stop = [] if completion.stop_token is None else [completion.stop_token]
    return ImageAnswer(completion.text, completion.token_ids + stop, completion.stop_token is not None)


def chat_with_images(
    model: MobiLlamaV,
    tokenizer,
    processor,
    messages: list[dict[str, str]],
    images: list,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """Answer a conversation whose user turns hold ``<image>`` placeholders (one per image, in order).

    ``images`` are Pillow images or paths. A user turn is given the placeholder at its start when the
    conversation has images but no placeholder (the common "ask about this picture" case).
    """
    images = [
        load_image(im, f"image {i + 1}") if isinstance(im, (str, Path)) else im for i, im in enumerate(images)
    ]
    ids = image_prompt_ids(tokenizer, messages, len(images))
    return generate_from_ids(
        model,
        tokenizer,
        processor,
        ids,
        images,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    ).text


def answer_image_question(
    checkpoint: str | Path,
    image: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
) -> str:
    """One question about one image file (``mobillama vision chat``)."""
    model, tokenizer, processor = load_vision_chat(checkpoint)
    return chat_with_images(
        model,
        tokenizer,
        processor,
        [{"role": "user", "content": prompt}],
        [image],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
