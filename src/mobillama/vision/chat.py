"""Image chat: the library entry points the chat CLI and the server call for a vision checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from mobillama.errors import MobiLlamaError
from mobillama.vision.model import IMAGE_PLACEHOLDER, MobiLlamaV, build_image_processor


def load_vision_chat(checkpoint: str | Path, device: str = "cpu"):
    """(model, tokenizer, image processor) of a MobiLlama-V checkpoint directory."""
    from transformers import AutoTokenizer

    model = MobiLlamaV.from_pretrained(checkpoint, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError) as e:
        raise MobiLlamaError(f"{checkpoint}: no usable tokenizer files ({str(e).splitlines()[0]})") from None
    return model, tokenizer, build_image_processor(model.vision_config)


def render_image_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text with the tokenizer's chat template (MobiLlama-Chat's format when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from mobillama.generate import render_mobillama_chat

    return render_mobillama_chat(messages, add_generation_prompt=True)


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
    from mobillama.vision.data import load_image, tokenize_with_placeholders

    images = [
        load_image(im, f"image {i + 1}") if isinstance(im, (str, Path)) else im for i, im in enumerate(images)
    ]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and placeholders == 0:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise MobiLlamaError("an image needs a user message to attach to")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = (
            IMAGE_PLACEHOLDER * len(images) + "\n" + messages[first_user]["content"]
        )
    elif placeholders != len(images):
        raise MobiLlamaError(
            f"the messages have {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
        )
    ids, _ = tokenize_with_placeholders(tokenizer, render_image_prompt(tokenizer, messages))
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    device = next(model.parameters()).device
    pixels = (
        processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        if images
        else None
    )
    out = model.generate(
        torch.tensor([ids], device=device),
        None if pixels is None else pixels.to(device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_token_id,
        seed=seed,
    )[0]
    return tokenizer.decode(out, skip_special_tokens=True).strip()


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
