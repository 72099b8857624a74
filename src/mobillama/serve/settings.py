"""The server's settings: one object, built by ``mobillama serve`` from its flags and read by the gate and
the routes, so every knob the server has is listed in one place."""

from __future__ import annotations

from dataclasses import dataclass

from mobillama.serve.vision import MAX_IMAGE_BYTES


@dataclass
class ServeSettings:
    """Everything the app needs to know besides the model."""

    model_name: str = "mobillama"
    api_key: str | None = None
    max_concurrency: int = 1
    queue_size: int = 16
    max_body_bytes: int = 1_000_000
    log_prompts: bool = False
    default_max_tokens: int = 256
    retry_after_s: int = 1
    max_image_bytes: int = MAX_IMAGE_BYTES  # per image (decoded data URL or file); vision models only
    host: str = "127.0.0.1"  # the bound address: a Host header the server answers to
    allowed_hosts: tuple[str, ...] = ()  # more Host names to answer to ("*": any; see serve.security)
    image_dir: str | None = None  # local image paths are read only inside it (None: refused)


__all__ = ["ServeSettings"]
