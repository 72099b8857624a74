"""Loss, perplexity and bits per byte of a checkpoint on a prepared validation split.

Reads the token shards of ``mobillama data prepare`` through :func:`mobillama.data.shards.read_split`
(the training loader's reader and checks: format, version, sizes, sha256, token ids; packed
``seq_len + 1`` rows: inputs ``row[:-1]``, targets ``row[1:]``). Bits per byte makes models with different
tokenizers comparable; it needs the UTF-8 byte count of the scored text. When the manifest records it
(``splits.val.num_bytes``) that is used; otherwise each row's target tokens are decoded with the
checkpoint's tokenizer and their bytes counted. The report says which (``bytes_source``).
"""

from __future__ import annotations

import math
import pydoc_data.topics as topics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mobillama.data.shards import check_token_ids, read_split
from mobillama.errors import MobiLlamaError
from mobillama.eval.loading import load_eval_model, load_eval_tokenizer, quantization_of

_BYTES_KEYS = ("num_bytes", "bytes", "text_bytes")


def evaluate_perplexity(
    checkpoint: str | Path,
    data_dir: str | Path,
    *,
    split: str = "val",
    batch_size: int = 8,
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Mean next-token loss (nats), perplexity, bits per byte and counts on ``split``.

    A quantized checkpoint is scored as quantized (see :mod:`mobillama.eval.loading`).
    """
    manifest, arrays = read_split(data_dir, split)
    if not arrays:
        raise MobiLlamaError(f"{data_dir}: the {split!r} split has no shards")
    model = load_eval_model(checkpoint, dtype=dtype)
    vocab = model.config.vocab_size
    width = manifest["sample_len"]
    if width - 1 > model.config.max_position_embeddings:
        raise MobiLlamaError(
            f"{data_dir}: seq_len {width - 1} exceeds the model's maximum length "
            f"{model.config.max_position_embeddings}"
        )
    rows = np.concatenate(arrays)[:limit] if limit else np.concatenate(arrays)
    check_token_ids(rows, vocab, data_dir, whose="the model's")
    manifest_bytes = next(
        (manifest["splits"][split][k] for k in _BYTES_KEYS if k in manifest["splits"][split]), None
    )
    tokenizer = None
    if manifest_bytes is None or limit:
        tokenizer = load_eval_tokenizer(checkpoint)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch"):
            batch = torch.from_numpy(rows[start : start + batch_size].astype(np.int64))
            logits = model(batch[:, :-1]).float()
            nll = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
            if tokenizer is not None:
                for row in batch[:, 1:].tolist():
                    total_bytes += len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8"))
    if total_tokens == 0:
        raise MobiLlamaError(f"{data_dir}: the {split!r} split has no samples")
    bytes_source = "decoded target tokens" if tokenizer is not None else "manifest"
    n_bytes = total_bytes if tokenizer is not None else int(manifest_bytes)
    loss = total_nll / total_tokens
    return {
        "checkpoint": str(checkpoint),
        "quantization": quantization_of(checkpoint),
        "data_dir": str(data_dir),
        "split": split,
        "samples": int(len(rows)),
        "tokens": total_tokens,
        "bytes": n_bytes,
        "bytes_source": bytes_source,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / n_bytes if n_bytes else None,
    }


def reference_text(chars: int | None = None) -> str:
    """Real English prose with code that every Python install carries: the reference topics of
    ``pydoc_data`` in a fixed order. One definition for the tests, the benchmarks and the docs' figures,
    so a perplexity quoted anywhere is measured on the same text."""
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text if chars is None else text[:chars]


def windowed_perplexity(
    model: torch.nn.Module,
    ids: list[int],
    *,
    ctx: int = 512,
    bos_id: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
) -> dict:
    """Perplexity of a token stream scored the way llama.cpp's ``llama-perplexity`` scores it.

    The stream is cut into windows of ``ctx`` tokens (a tail shorter than a window is dropped); where the
    tokenizer adds BOS (``bos_id``), each window's first token is replaced by it; only the second half of
    each window is scored (positions ``ctx/2 .. ctx-2`` predicting the next token), so every scored token
    has at least ``ctx/2`` tokens of context. Using the same cut and the same scored positions is what
    makes the figure comparable with llama.cpp's on the same text. The ± is the standard error of the
    mean token loss carried through ``exp`` (llama.cpp reports the same quantity).
    """
    if ctx < 4 or ctx % 2:
        raise MobiLlamaError(f"context {ctx} must be an even number of at least 4 tokens")
    n_windows = len(ids) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise MobiLlamaError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    rows = torch.tensor(ids[: n_windows * ctx], dtype=torch.long).reshape(n_windows, ctx)
    if bos_id is not None:
        rows[:, 0] = bos_id
    first = ctx // 2
    losses = []
    param = next(model.parameters())
    with torch.inference_mode():
        for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=None):
            batch = rows[start : start + batch_size].to(param.device)
            logits = model(batch)[:, first:-1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, first + 1 :].reshape(-1), reduction="none"
            )
            losses.append(nll.cpu().double())
    nll = torch.cat(losses)
    mean = float(nll.mean())
    stderr = float(nll.std(unbiased=True) / math.sqrt(nll.numel())) if nll.numel() > 1 else 0.0
    return {
        "perplexity": math.exp(mean),
        "perplexity_stderr": math.exp(mean) * stderr,
        "loss": mean,
        "windows": n_windows,
        "ctx": ctx,
        "scored_tokens": int(nll.numel()),
    }
