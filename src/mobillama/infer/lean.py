"""The lean runtime: greedy decode of a quantized checkpoint in a process that never imports PyTorch.

Why: on a small model PyTorch's own runtime is most of the memory. ``import torch`` alone holds ~0.22 GB
resident (its operator registry, Python modules and library pages), more than SmolLM2-135M's int4 weights;
llama.cpp, a C++ program, needs none of that. On a CPU with AVX-512 VNNI the default runtime already
runs a quantized model's whole decode step in one call into the project's C kernels
(``mb_decode_layers``), so Python only feeds token ids in and reads logits out: numpy and ctypes do that
as well as torch. This module is that loop, nothing more (batch 1, greedy), and what it computes is the
default runtime's decode step on the same packed bytes.

The weights come from the checkpoint's *kernel image* (:mod:`mobillama.infer.lean_image`), written once
by a torch child process the first time a checkpoint is opened and cached under
``~/.cache/mobillama/lean`` (keyed by the checkpoint files' size, time and the image format). Weights
are read into anonymous, huge-page-backed buffers as the default runtime keeps them; the embedding table
and rotary tables stay mapped from the file, so only the rows a request touches become resident.

Prompt tokens go through ``mb_prefill_layers``: the projections read each weight once for the whole
prompt and attention runs token by token (the default runtime uses PyTorch's attention there, so
logits agree to rounding, not bit for bit).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mobillama.errors import MobiLlamaError
from mobillama.kernels import clib
from mobillama.tensorfile import TensorEntry, read_header

IMAGE_VERSION = 1
IMAGE_KEY = "mobillama_lean"
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
NUMPY_DTYPES = {"U8": np.uint8, "I16": np.uint16, "U16": np.uint16, "F16": np.float16, "F32": np.float32}
# files of a checkpoint that decide its image
SOURCE_FILES = ("config.json", "quantization.json", "model.safetensors")


def cache_root() -> Path:
    root = os.environ.get("MOBILLAMA_CACHE") or Path.home() / ".cache" / "mobillama"
    return Path(root) / "lean"


def image_path(checkpoint: str | Path) -> Path:
    """Where the kernel image of ``checkpoint`` lives: a name that changes when any of its files, the
    image format or the kernels' sources change (so a stale image is never read)."""
    ckpt = Path(checkpoint).resolve()
    h = hashlib.sha256(f"{ckpt}\0{IMAGE_VERSION}".encode())
    for name in SOURCE_FILES:
        try:
            st = (ckpt / name).stat()
        except OSError:
            raise MobiLlamaError(f"{checkpoint}: not a quantized checkpoint directory (no {name})") from None
        h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    from mobillama.kernels.build import HEADERS, SOURCES

    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    return cache_root() / f"{ckpt.name}-{h.hexdigest()[:16]}.safetensors"


def ensure_image(checkpoint: str | Path, *, quiet: bool = False) -> Path:
    """The kernel image of ``checkpoint``, written first (in a torch child process) if it is missing."""
    reason = clib.unavailable_reason()
    if reason is not None:
        raise MobiLlamaError(f"the lean runtime needs the project's CPU kernels: {reason}")
    out = image_path(checkpoint)
    if out.is_file():
        return out
    if not quiet:
        print(f"writing the kernel image of {checkpoint} (once) ...", file=sys.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "mobillama.infer.lean_image", str(checkpoint), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MobiLlamaError(
            f"{checkpoint}: could not write its kernel image: {last.removeprefix('error: ')}"
        )
    return out


def image_layout(path: str | Path) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
    """(metadata, tensor entries) of a kernel image, checked: a damaged or foreign file is an error."""
    entries, metadata = read_header(path)
    try:
        meta = json.loads(metadata[IMAGE_KEY])
        if meta["version"] != IMAGE_VERSION:
            raise ValueError(f"format version {meta['version']}, this runtime reads {IMAGE_VERSION}")
        names = ["norm", "rope.cos", "rope.sin"]
        for i, layer in enumerate(meta["layers"]):
            names += [f"layer.{i}.norm1", f"layer.{i}.norm2", f"layer.{i}.qkv.w", f"layer.{i}.o.w"]
            names += [f"ffn.{layer['ffn']}.gate_up.w", f"ffn.{layer['ffn']}.down.w"]
        names.append("head.w" if meta["head"]["kind"] == "packed" else "head.bf16")
        missing = [n for n in names if n not in entries]
        if missing or not ({"embed.bf16", "embed.f32"} & set(entries)):
            raise ValueError(f"missing tensors {missing or ['embed']}")
    except (KeyError, TypeError, ValueError) as e:
        raise MobiLlamaError(f"{path}: not a kernel image of this version ({e})") from None
    return meta, entries


def _huge_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array backed by 2 MB pages where Linux allows it (as the default runtime
    packs its weights: a whole decode's matmuls ran ~16% faster than on 4 KB pages)."""
    if nbytes < HUGE_PAGE:
        return np.empty(nbytes, dtype=np.uint8)
    base = np.empty(nbytes + HUGE_PAGE, dtype=np.uint8)
    start = -base.ctypes.data % HUGE_PAGE
    buffer = base[start : start + nbytes]
    libc = clib.libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.madvise(
                ctypes.c_void_p(buffer.ctypes.data), ctypes.c_size_t(nbytes // 4096 * 4096), MADV_HUGEPAGE
            )
    return buffer


class LeanModel:
    """A quantized checkpoint's kernel image, ready to decode (batch 1, greedy).

    ``LeanModel.open(CKPT)`` writes the image if needed and loads it; :meth:`prefill` runs a prompt
    into the cache and returns the last position's logits, :meth:`decode` one token at the next slot,
    :meth:`greedy` both until ``max_new_tokens`` or an end token.
    """

    def __init__(self, image: str | Path, threads: int | None = None) -> None:
        self.path = Path(image)
        self.meta, entries = image_layout(self.path)
        m = self.meta
        self.hidden, self.vocab = m["hidden"], m["vocab"]
        self.heads = (m["heads"], m["kv_heads"], m["head_dim"])
        self.intermediate, self.max_positions = m["intermediate"], m["max_positions"]
        self.threads = threads if threads is not None else len(os.sched_getaffinity(0))
        if self.threads < 1:
            raise MobiLlamaError(f"threads must be >= 1, got {self.threads}")
        self.lib = clib.load_library()
        self._keep: list[np.ndarray] = []  # buffers the C structs point into
        with open(self.path, "rb") as f:
            read = {n: self._read(f, e) for n, e in entries.items() if not n.startswith(("embed", "rope"))}
        # Read row by row with plain reads, never mapped: the kernel maps whole large folios of a mapped
        # file (up to 2 MB), so a few random embedding rows had made ~30 MB resident.
        self._file = open(self.path, "rb")  # noqa: SIM115 - open for the model's lifetime
        self.embed_bf16 = "embed.bf16" in entries
        self._embed = entries["embed.bf16" if self.embed_bf16 else "embed.f32"]
        self._rope = (entries["rope.cos"], entries["rope.sin"])
        self.norm = read["norm"].view(np.float32)
        self.weight_bytes = sum(a.nbytes for a in read.values())
        self.layers = (clib.DecodeLayer * len(m["layers"]))()
        for i, spec in enumerate(m["layers"]):
            layer = self.layers[i]
            layer.norm1 = read[f"layer.{i}.norm1"].ctypes.data
            layer.norm2 = read[f"layer.{i}.norm2"].ctypes.data
            layer.norm_bf16, layer.eps1, layer.eps2 = 0, spec["eps1"], spec["eps2"]
            layer.qkv = self._qmatrix(read, f"layer.{i}.qkv", spec["qkv"])
            layer.o = self._qmatrix(read, f"layer.{i}.o", spec["o"])
            ffn = m["ffns"][str(spec["ffn"])]
            layer.gate_up = self._qmatrix(read, f"ffn.{spec['ffn']}.gate_up", ffn["gate_up"])
            layer.down = self._qmatrix(read, f"ffn.{spec['ffn']}.down", ffn["down"])
        self.head = m["head"]
        self.head_matrix = self._qmatrix(read, "head", self.head) if self.head["kind"] == "packed" else None
        self.head_bf16 = read["head.bf16"] if self.head["kind"] == "bf16" else None
        self._keep += list(read.values())
        self.cache_bf16 = m["cache"] == "bf16"
        self.cache_len = 0
        self.position = 0

    @classmethod
    def open(cls, checkpoint: str | Path, threads: int | None = None, *, quiet: bool = False) -> LeanModel:
        return cls(ensure_image(checkpoint, quiet=quiet), threads)

    # ---- loading ---------------------------------------------------------------------------------
    def _read(self, f, e: TensorEntry) -> np.ndarray:
        buffer = _huge_buffer(e.nbytes)
        f.seek(e.offset)
        if f.readinto(memoryview(buffer)) != e.nbytes:
            raise MobiLlamaError(f"{self.path}: cut short (truncated file?)")
        return buffer

    def _row(self, e: TensorEntry, index: int, count: int = 1) -> np.ndarray:
        """Rows ``index .. index+count-1`` of the 2-D tensor ``e``, read from the file."""
        dtype = np.dtype(NUMPY_DTYPES[e.dtype])
        row_bytes = e.shape[1] * dtype.itemsize
        data = os.pread(self._file.fileno(), row_bytes * count, e.offset + index * row_bytes)
        if len(data) != row_bytes * count:
            raise MobiLlamaError(f"{self.path}: cut short (truncated file?)")
        return np.frombuffer(data, dtype=dtype).reshape(count, e.shape[1])

    def _qmatrix(self, read: dict[str, np.ndarray], name: str, spec: dict) -> clib.QMatrix:
        w, p = read[f"{name}.w"], read[f"{name}.p"]
        return clib.QMatrix(w.ctypes.data, p.ctypes.data, spec["n"], spec["group"], spec["bits"], spec["ab"])

    # ---- decoding --------------------------------------------------------------------------------
    def start(self, total_len: int) -> None:
        """A fresh cache for a request of ``total_len`` tokens (prompt plus new ones)."""
        if not 1 <= total_len <= self.max_positions:
            raise MobiLlamaError(f"{total_len} tokens do not fit the model's context of {self.max_positions}")
        H, Hkv, D = self.heads
        length = min(self.max_positions, -(-total_len // 64) * 64)
        if length != self.cache_len:
            dtype = np.uint16 if self.cache_bf16 else np.float32
            self._keys = [np.zeros((Hkv, length, D), dtype) for _ in range(len(self.layers))]
            self._values = [np.zeros((Hkv, length, D), dtype) for _ in range(len(self.layers))]
            for layer, k, v in zip(self.layers, self._keys, self._values, strict=True):
                layer.k_cache, layer.v_cache = k.ctypes.data, v.ctypes.data
            self.cache_len = length
        # this request's rotary rows (a few KB), read once
        self.cos, self.sin = (
            np.ascontiguousarray(self._row(e, 0, total_len), dtype=np.float32) for e in self._rope
        )
        self.limit = total_len
        self.position = 0

    def _rows(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = int(ids[(ids < 0) | (ids >= self.vocab)][0])
            raise MobiLlamaError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
        rows = np.concatenate([self._row(self._embed, int(i)) for i in ids])
        if self.embed_bf16:
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return np.array(rows, dtype=np.float32)

    def _advance(self, n: int) -> int:
        first = self.position
        if n < 1 or first + n > self.limit:
            raise MobiLlamaError(f"{first + n} tokens exceed this request's {self.limit} (see start())")
        self.position += n
        return first

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Run prompt ``ids`` into the next cache slots; fp32 logits of its last token [vocab]."""
        x = np.ascontiguousarray(self._rows(ids))
        first = self._advance(len(x))
        H, Hkv, D = self.heads
        rc = self.lib.mb_prefill_layers(
            x.ctypes.data, len(x), self.hidden, ctypes.addressof(self.layers), len(self.layers),
            self.cos[first:].ctypes.data, self.sin[first:].ctypes.data, self.cache_len, first,
            self.cache_bf16, H, Hkv, D, self.intermediate, D**-0.5, self.threads,
        )  # fmt: skip
        if rc:
            raise MemoryError("prefill: could not allocate its activation buffers")
        return self._logits(x[-1:])

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next cache slot; fp32 logits [vocab]."""
        x = np.ascontiguousarray(self._rows([token]))
        slot = self._advance(1)
        H, Hkv, D = self.heads
        rc = self.lib.mb_decode_layers(
            x.ctypes.data, 1, self.hidden, ctypes.addressof(self.layers), len(self.layers),
            self.cos[slot].ctypes.data, self.sin[slot].ctypes.data, self.cache_len, slot, None,
            self.cache_bf16, H, Hkv, D, self.intermediate, D**-0.5, self.threads,
        )  # fmt: skip
        if rc:
            raise MemoryError("decode step: could not allocate its activation buffers")
        return self._logits(x)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        h = np.empty((1, self.hidden), dtype=np.float32)
        self.lib.mb_rmsnorm(
            x.ctypes.data, 1, self.hidden, self.norm.ctypes.data, 0, self.meta["final_eps"], h.ctypes.data
        )
        logits = np.empty(self.vocab, dtype=np.float32)
        if self.head_matrix is not None:
            m = self.head_matrix
            rc = self.lib.mb_qgemv(
                h.ctypes.data, 1, self.hidden, m.w, m.params, m.n, m.group, m.bits, m.ab, logits.ctypes.data,
                self.threads,
            )  # fmt: skip
            if rc:
                raise MemoryError("LM head: could not allocate its activation buffers")
        else:
            self.lib.mb_bf16_gemv(
                h.ctypes.data,
                1,
                self.hidden,
                self.head_bf16.ctypes.data,
                self.vocab,
                logits.ctypes.data,
                self.threads,
            )
        return logits

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """The greedy continuation of prompt ``ids``: at most ``max_new_tokens`` ids, ending at a stop id."""
        if not ids:
            raise MobiLlamaError("the prompt is empty: give at least one token")
        self.start(len(ids) + max_new_tokens)
        out = [int(np.argmax(self.prefill(ids)))]
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            out.append(int(np.argmax(self.decode(out[-1]))))
        return out


# ---- measurement ---------------------------------------------------------------------------------
def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 where there is none)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so a run's peak excludes loading."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def lean_bench(
    checkpoint: str | Path,
    *,
    prompt_len: int = 128,
    new_tokens: int = 128,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time a prefill and greedy decode on the lean runtime (the keys of ``mobillama bench --json``)."""
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise MobiLlamaError(f"{name} must be a positive integer, got {value!r}")
    image = ensure_image(checkpoint)
    model = LeanModel(image, threads)
    if prompt_len + new_tokens > model.max_positions:
        raise MobiLlamaError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the context {model.max_positions}"
        )
    load_peak_kb = status_kb("VmHWM")
    prompt = np.random.default_rng(seed).integers(3, model.vocab, prompt_len).tolist()

    def one_run(length: int, steps: int) -> tuple[float, float]:
        model.start(length + steps)
        t0 = time.perf_counter()
        token = int(np.argmax(model.prefill(prompt[:length])))
        t1 = time.perf_counter()
        for _ in range(steps - 1):
            token = int(np.argmax(model.decode(token)))
        return t1 - t0, time.perf_counter() - t1

    one_run(min(prompt_len, 16), 4)  # warm-up
    rss_reset = reset_peak_rss()
    prefill_s, decode_s = one_run(prompt_len, new_tokens)
    import resource

    peak_kb = status_kb("VmHWM") if rss_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": str(checkpoint),
        "runtime": "lean",
        "image": str(image),
        "kernel_used": "vnni",
        "threads": model.threads,
        "batch": 1,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tok_s": prompt_len / prefill_s,
        "ttft_s": prefill_s,
        "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "model_bytes": model.weight_bytes,
        "peak_rss_bytes": peak_kb * 1024,
        "load_peak_rss_bytes": load_peak_kb * 1024,
        "peak_rss_excludes_load": rss_reset,
        "torch_imported": "torch" in sys.modules,
    }


def format_lean_bench(r: dict[str, Any]) -> str:
    """A small human-readable table of one :func:`lean_bench` result."""
    mb = 1 << 20
    rows = [
        ("model", f"{r['model']} (lean runtime, vnni kernel; torch imported: {r['torch_imported']})"),
        ("kernel image", r["image"]),
        ("threads / batch", f"{r['threads']} / 1"),
        ("prompt / new tokens", f"{r['prompt_len']} / {r['new_tokens']}"),
        ("prefill", f"{r['prefill_tok_s']:.1f} tok/s"),
        ("time to first token", f"{r['ttft_s'] * 1000:.0f} ms"),
        ("decode", "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f} tok/s"),
        ("weight bytes", f"{r['model_bytes'] / mb:.0f} MB"),
        (
            "peak RSS (run / load)",
            f"{r['peak_rss_bytes'] / mb:.0f} MB / {r['load_peak_rss_bytes'] / mb:.0f} MB",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
