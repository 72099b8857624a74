"""Inference speed: prefill and decode tokens/s, time to first token, memory, and bandwidth vs a roofline.

At batch 1 a decode step reads every weight once per use, so the ceiling is memory bandwidth divided by
the bytes a token reads. That ceiling is measured here (a big ``sum``), not assumed, and the achieved
bandwidth is reported against it. Two byte counts are given: ``bytes_per_token`` counts the shared FFN
once per layer that uses it (what the hardware must stream if nothing stays in cache) and
``unique_bytes_per_token`` counts it once (the floor if the FFN stayed cache-resident); the achieved
bandwidth is reported for both (``achieved_gb_s``: re-read bytes x tok/s, ``achieved_unique_gb_s``:
unique bytes x tok/s). With ``ffn_sharing: none`` the two are equal.

Speed is only worth quoting next to quality: with ``perplexity_text`` the same model object (same bits,
group size and kernels) also scores a text file the way llama.cpp's ``llama-perplexity`` does, after the
timing, so the quality cost of each option is reported beside its speed.
"""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobillama.config import parse_dtype
from mobillama.errors import MobiLlamaError
from mobillama.eval.perplexity import windowed_perplexity
from mobillama.infer import quant
from mobillama.infer.generator import Generator
from mobillama.infer.lean import reset_peak_rss, status_kb
from mobillama.infer.load import (
    INFERENCE_DTYPES,
    check_on_the_fly_quantization,
    describe_checkpoint,
    load_checkpoint_tokenizer,
    load_for_inference,
    serve_embedding_from_file,
)
from mobillama.infer.quant_checkpoint import load_quantized
from mobillama.tokenizer import conventions


def measure_read_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth in GB/s of a ``sum`` over a buffer far larger than the cache."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def _module_bytes(module: nn.Module) -> int:
    return quant.weight_bytes(module)


def bytes_per_decode_token(model: nn.Module, context_len: int, kv_bytes: int = 4) -> tuple[int, int]:
    """(bytes read per decoded token with each layer re-reading its FFN, the same with each FFN once).

    Weights of every layer, the final norm, the LM head and one embedding row, plus the KV cache
    (``kv_bytes`` per value: 4 for fp32, 2 for bf16) read at ``context_len`` tokens.
    """
    c = model.config
    layers = model.model.layers
    attn = sum(_module_bytes(layer) for layer in layers)
    ffn_per_use = sum(_module_bytes(model.model.ffns[c.ffn_index(i)]) for i in range(len(layers)))
    ffn_unique = sum(_module_bytes(f) for f in model.model.ffns)
    head = _module_bytes(model.lm_head) + _module_bytes(model.model.norm)
    row = quant.embedding_row_bytes(model)
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * kv_bytes * context_len
    common = attn + head + row + kv
    return common + ffn_per_use, common + ffn_unique


def duplicate_ffn(model: nn.Module) -> nn.Module:
    """Give every layer its own copy of its FFN (same values): the "FFN stored 22 times" control."""
    c = model.config
    copies = nn.ModuleList(
        copy.deepcopy(model.model.ffns[c.ffn_index(i)]) for i in range(c.num_hidden_layers)
    )
    model.model.ffns = copies
    model.config = model.model.config = c.replace(ffn_sharing="none")
    return model


def read_perplexity_text(path: str | Path) -> str:
    """The UTF-8 text of ``path`` for the perplexity figure; a missing, empty or binary file is an error."""
    path = Path(path)
    if not path.is_file():
        raise MobiLlamaError(f"perplexity text {path} not found")
    data = path.read_bytes()
    if not data.strip():
        raise MobiLlamaError(f"perplexity text {path} is empty")
    if b"\x00" in data:
        raise MobiLlamaError(f"perplexity text {path} is a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MobiLlamaError(
            f"perplexity text {path} is not UTF-8 (byte {e.start}): give a plain text file"
        ) from None


def perplexity_ids(tokenizer: Any, text: str) -> tuple[list[int], int | None]:
    """(token ids of a plain document, the BOS id each window starts with or None), by the tokenizer's rule.

    Special-token spellings in the document stay characters (``parse_special=False``); BOS goes in front
    only where the tokenizer adds it to plain text, and then also replaces each window's first token, as
    ``llama-perplexity`` does, so the figure is comparable with llama.cpp's on the same file.
    """
    c = conventions(tokenizer)
    ids = tokenizer.encode(text, parse_special=False)
    bos = c.bos_id if c.add_bos else None
    return ([bos] if bos is not None else []) + ids, bos


def run_bench(
    spec: str | Path,
    *,
    dtype: str = "bf16",
    bits: int | None = None,
    group_size: int | None = None,
    head_bits: int | None = None,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    prompt_len: int = 128,
    new_tokens: int = 128,
    threads: int | None = None,
    batch: int = 1,
    compile: bool = False,
    duplicate: bool = False,
    measure_bandwidth: bool = True,
    seed: int = 0,
    perplexity_text: str | Path | None = None,
    perplexity_windows: int = 8,
    perplexity_ctx: int = 512,
) -> dict[str, Any]:
    """Time one prefill and ``new_tokens`` greedy decode steps on a preset (random weights) or checkpoint.

    With ``perplexity_text`` (a checkpoint with its tokenizer only), the timed model then scores that file
    in up to ``perplexity_windows`` windows of ``perplexity_ctx`` tokens (llama.cpp's method, see
    :func:`mobillama.eval.perplexity.windowed_perplexity`); the file is checked before the model loads.
    """
    for name, value, low in (
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 2),
        ("batch", batch, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MobiLlamaError(f"{name} must be an integer >= {low}, got {value!r}")
    ppl_ids: list[int] | None = None
    ppl_bos: int | None = None
    if perplexity_text is not None:
        for name, value in (("perplexity_windows", perplexity_windows), ("perplexity_ctx", perplexity_ctx)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MobiLlamaError(f"{name} must be an integer >= 1, got {value!r}")
        if perplexity_ctx < 4 or perplexity_ctx % 2:
            raise MobiLlamaError(
                f"perplexity_ctx {perplexity_ctx} must be an even number of at least 4 tokens"
            )
        text = read_perplexity_text(perplexity_text)
        if not Path(spec).is_dir():
            raise MobiLlamaError(
                f"a perplexity needs a checkpoint directory with its tokenizer; {spec} is not one "
                "(a preset has random weights and no tokenizer)"
            )
        ppl_ids, ppl_bos = perplexity_ids(load_checkpoint_tokenizer(spec), text)
        if len(ppl_ids) < perplexity_ctx:
            raise MobiLlamaError(
                f"perplexity text {perplexity_text} has {len(ppl_ids)} tokens, fewer than one window of "
                f"{perplexity_ctx}: give a longer text or a smaller perplexity_ctx"
            )
    if threads is not None:
        if threads < 1:
            raise MobiLlamaError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch_dtype = parse_dtype(dtype, INFERENCE_DTYPES)
    what = describe_checkpoint(spec)
    check_on_the_fly_quantization(spec, what, bits, head_bits)
    if what.is_quantized:
        # packed while loading, as load_for_inference does, except where the FFN is copied per layer first
        model = load_quantized(
            spec, dtype=torch_dtype, int8_kernel=int8_kernel, int4_kernel=int4_kernel, pack=not duplicate
        )
        if duplicate:
            duplicate_ffn(model)
            quant.pack_for_inference(model)
        serve_embedding_from_file(model, spec)  # as load_for_inference does
    else:
        model = load_for_inference(spec, dtype=torch_dtype, seed=seed)
        if duplicate:
            duplicate_ffn(model)
        if bits is not None:
            quant.quantize_model(
                model, bits, group_size, int8_kernel=int8_kernel, int4_kernel=int4_kernel, head_bits=head_bits
            )
    c = model.config
    if ppl_ids is not None and perplexity_ctx > c.max_position_embeddings:
        raise MobiLlamaError(
            f"perplexity_ctx {perplexity_ctx} exceeds the model's context {c.max_position_embeddings}"
        )
    if prompt_len + new_tokens > c.max_position_embeddings:
        raise MobiLlamaError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the context {c.max_position_embeddings}"
        )
    load_peak_kb = status_kb("VmHWM")
    gen = Generator(model, compile=compile)
    rng = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, c.vocab_size, (batch, prompt_len), generator=rng)
    dec = gen.decoder

    def one_run(length: int, steps: int) -> tuple[float, float]:
        dec.start([0] * batch, length + steps)
        t0 = time.perf_counter()
        tok = dec.prefill(prompts[:, :length]).argmax(-1)
        t1 = time.perf_counter()
        for i in range(steps - 1):
            tok = dec.decode(tok, length + i).argmax(-1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    one_run(min(prompt_len, 16), 4)  # warm-up (and compilation when asked)
    one_run(prompt_len, 2)
    rss_reset = reset_peak_rss()
    prefill_s, decode_s = one_run(prompt_len, new_tokens)
    peak_kb = status_kb("VmHWM") if rss_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_token, unique_per_token = bytes_per_decode_token(
        model, prompt_len + new_tokens // 2, dec.cache_dtype.itemsize
    )
    decode_tps = (new_tokens - 1) * batch / decode_s
    bits = bits if bits is not None else getattr(model, "quantization", {}).get("bits")
    result: dict[str, Any] = {
        "model": str(spec),
        "dtype": dtype,
        "bits": bits,
        "int8_kernel": int8_kernel if (bits == 8) else None,
        "int4_kernel": int4_kernel if (bits == 4) else None,
        "kernel_used": quant.kernels_in_use(model),
        "dequantizing_layers": quant.dequantizing_layers(model),
        "group_size": getattr(model, "quantization", {}).get("group_size") if bits == 4 else None,
        "ffn": "duplicated" if duplicate else c.ffn_sharing,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "compile": compile,
        "prefill_tok_s": prompt_len * batch / prefill_s,
        "ttft_s": prefill_s,
        "decode_tok_s": decode_tps,
        "model_bytes": quant.weight_bytes(model),
        "bytes_per_token": per_token,
        "unique_bytes_per_token": unique_per_token,
        "achieved_gb_s": per_token * decode_tps / batch / 1e9,
        "achieved_unique_gb_s": unique_per_token * decode_tps / batch / 1e9,
        "peak_rss_bytes": peak_kb * 1024,
        "load_peak_rss_bytes": load_peak_kb * 1024,
        "peak_rss_excludes_load": rss_reset,
    }
    if measure_bandwidth:
        bw = measure_read_bandwidth()
        result["roofline_gb_s"] = bw
        result["roofline_tok_s"] = bw * 1e9 / per_token
        result["fraction_of_roofline"] = result["achieved_gb_s"] / bw
        result["unique_fraction_of_roofline"] = result["achieved_unique_gb_s"] / bw
    if ppl_ids is not None:
        del gen, dec  # the decoder's KV cache is not needed for scoring
        t0 = time.perf_counter()
        r = windowed_perplexity(
            model, ppl_ids, ctx=perplexity_ctx, bos_id=ppl_bos, max_windows=perplexity_windows
        )
        result["perplexity"] = {
            "text": str(perplexity_text),
            **r,
            "bos": ppl_bos is not None,
            "seconds": time.perf_counter() - t0,
        }
    return result


def format_bench(r: dict[str, Any]) -> str:
    """A small human-readable table of one :func:`run_bench` result."""
    gb = 1e9
    variant = f"{r['dtype']}" + (f" int{r['bits']}" if r.get("bits") else "")
    if r.get("group_size"):
        variant += f" g{r['group_size']}"
    if r.get("kernel_used"):
        variant += f", {r['kernel_used']} kernel"
    if r.get("dequantizing_layers"):
        variant += f" ({r['dequantizing_layers']} layer(s) dequantizing every call)"
    variant += f", FFN {r['ffn']}"
    rows = [
        ("model", f"{r['model']} ({variant})"),
        ("threads / batch", f"{r['threads']} / {r['batch']}"),
        ("prompt / new tokens", f"{r['prompt_len']} / {r['new_tokens']}"),
        ("prefill", f"{r['prefill_tok_s']:.1f} tok/s"),
        ("time to first token", f"{r['ttft_s'] * 1000:.0f} ms"),
        ("decode", f"{r['decode_tok_s']:.2f} tok/s"),
        ("model bytes", f"{r['model_bytes'] / gb:.3f} GB"),
        (
            "peak RSS (run)",
            f"{r['peak_rss_bytes'] / gb:.3f} GB ({r['peak_rss_bytes'] / r['model_bytes']:.2f}x model)",
        ),
        (
            "bytes read / token",
            f"{r['bytes_per_token'] / gb:.3f} GB with the FFN re-read per layer, "
            f"{r['unique_bytes_per_token'] / gb:.3f} GB unique (FFN once)",
        ),
        (
            "achieved bandwidth",
            f"{r['achieved_gb_s']:.1f} GB/s on re-read bytes, {r['achieved_unique_gb_s']:.1f} GB/s on unique bytes",
        ),
    ]
    if "roofline_gb_s" in r:
        rows.append(
            (
                "roofline (measured)",
                f"{r['roofline_gb_s']:.1f} GB/s -> {r['roofline_tok_s']:.1f} tok/s; "
                f"achieved {100 * r['fraction_of_roofline']:.0f}% (re-read), "
                f"{100 * r['unique_fraction_of_roofline']:.0f}% (unique)",
            )
        )
    if "perplexity" in r:
        p = r["perplexity"]
        rows.append(
            (
                "perplexity",
                f"{p['perplexity']:.3f} ± {p['perplexity_stderr']:.3f} on {p['text']} ({p['windows']} windows of "
                f"{p['ctx']} tokens, second half scored, as llama-perplexity)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = [
    "bytes_per_decode_token",
    "duplicate_ffn",
    "format_bench",
    "measure_read_bandwidth",
    "perplexity_ids",
    "read_perplexity_text",
    "run_bench",
]
