"""The lean runtime: decode of a quantized checkpoint in a process that never imports PyTorch.

Why: on a small model PyTorch's own runtime is most of the memory. ``import torch`` alone holds ~0.22 GB
resident (its operator registry, Python modules and library pages), more than SmolLM2-135M's int4 weights;
llama.cpp, a C++ program, needs none of that. The default runtime already runs a quantized model's whole
decode step in one call into the project's C kernels (``mb_decode_layers``; ``mb_decode_layers_avx2`` on
a CPU without AVX-512), so Python only feeds token ids in and reads logits out, which ctypes does as well
as torch. This module is that loop, nothing more (batch 1, greedy or sampled), and what it computes is
the default runtime's decode step on the same packed bytes. It imports no array library either (numpy
alone is 16 MB resident): buffers are anonymous memory maps and ``bytearray``s, and the array operations it
needs (widening bf16 rows, argmax, drawing a token) are small C functions beside the kernels.

The weights come from the checkpoint's *kernel image* (:mod:`mobillama.infer.lean_image`), written once
by a torch child process the first time a checkpoint is opened and cached under
``~/.cache/mobillama/lean`` (keyed by the checkpoint files' size, time and the image format). Weights
are read into anonymous, huge-page-backed buffers as the default runtime keeps them; embedding rows and
a request's rotary rows are read from the file when needed (plain reads, never mapped: a mapped file's
rows become resident in whole 2 MB folios).

Prompt tokens go through ``mb_prefill_layers``: the projections read each weight once for the whole
prompt, and each token attends over the slots before it, which equals feeding the prompt one token at a
time exactly; the default runtime makes the same call for a prompt of one unpadded sequence.

Sampling takes the default runtime's parameters (:class:`~mobillama.infer.sampling.SamplingParams`: the
repetition penalty, temperature, top-k, top-p, seed) and its rules, with Python's ``random`` (seeded) as
the source of the draw, so a seed reproduces a lean run, not a PyTorch one.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import json
import mmap
import operator
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobillama.errors import MobiLlamaError
from mobillama.kernels import clib
from mobillama.tensorfile import TensorEntry, read_header

if TYPE_CHECKING:
    from mobillama.infer.sampling import SamplingParams

IMAGE_VERSION = 2  # 2: compact int4 params (a matrix's "per")
IMAGE_KEY = "mobillama_lean"
HUGE_PAGE = 2 << 20
# files of a checkpoint that decide its image
SOURCE_FILES = ("config.json", "quantization.json", "model.safetensors")


def cache_root() -> Path:
    from mobillama.kernels.build import cache_root as project_cache

    return project_cache() / "lean"


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
    for source in image_sources():
        h.update(source.read_bytes())
    return cache_root() / f"{ckpt.name}-{h.hexdigest()[:16]}.safetensors"


def image_sources() -> list[Path]:
    """The code that decides an image's bytes: the C kernels (the layout they read) and the Python that
    packs and writes (read as text here, never imported: they import torch)."""
    from mobillama.kernels.build import AVX2_SOURCES, HEADERS, SOURCES

    package = Path(__file__).resolve().parent.parent
    python = ["kernels/packing.py", "infer/quant_layers.py", "infer/decoder.py", "infer/lean_image.py"]
    return [*SOURCES, *AVX2_SOURCES, *HEADERS, *(package / name for name in python)]


def _kernel_isa() -> str:
    """The build of the kernels the lean runtime calls here: ``"vnni"`` (AVX-512) or ``"avx2"``."""
    isa = clib.matmul_isa()
    if isa is None:
        reason = clib.matmul_unavailable_reason()
        raise MobiLlamaError(f"the lean runtime needs the project's CPU kernels: {reason}")
    return isa


def ensure_image(checkpoint: str | Path, *, quiet: bool = False) -> Path:
    """The kernel image of ``checkpoint``, written first (in a torch child process) if it is missing."""
    _kernel_isa()
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
        _check_sizes(meta, entries)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise MobiLlamaError(f"{path}: not a kernel image of this version ({e})") from None
    return meta, entries


def _check_sizes(meta: dict[str, Any], entries: dict[str, TensorEntry]) -> None:
    """Every tensor the C code will read has the bytes its shape implies (the kernels trust them)."""
    hidden, H, Hkv, D = meta["hidden"], meta["heads"], meta["kv_heads"], meta["head_dim"]
    inter, vocab, positions = meta["intermediate"], meta["vocab"], meta["max_positions"]
    if min(hidden, H, Hkv, D, inter, vocab, positions) < 1 or H % Hkv or D % 16:
        raise ValueError("bad model dimensions")

    def expect(name: str, nbytes: int) -> None:
        if entries[name].nbytes != nbytes:
            raise ValueError(f"{name} holds {entries[name].nbytes} bytes, its shape needs {nbytes}")

    def matrix(name: str, spec: dict, n: int, k: int) -> None:
        group, bits, per = spec["group"], spec["bits"], spec["per"]
        ok = min(group, spec["ab"]) > 0 and spec["n"] == n and bits in (4, 8)
        ok = ok and not k % group and not group % spec["ab"] and not spec["ab"] % 4
        if not (ok and per in (0, clib.superblock_groups(k, group) if bits == 4 else 0)):
            raise ValueError(f"{name}: bad matrix description {spec}")
        blocks = -(-n // 16)
        expect(f"{name}.w", blocks * 16 * k * bits // 8)
        expect(f"{name}.p", clib.params_bytes(n, k, group, per))

    expect("norm", hidden * 4)
    for i, layer in enumerate(meta["layers"]):
        expect(f"layer.{i}.norm1", hidden * 4)
        expect(f"layer.{i}.norm2", hidden * 4)
        matrix(f"layer.{i}.qkv", layer["qkv"], (H + 2 * Hkv) * D, hidden)
        matrix(f"layer.{i}.o", layer["o"], hidden, H * D)
    for j, ffn in meta["ffns"].items():
        matrix(f"ffn.{j}.gate_up", ffn["gate_up"], 2 * inter, hidden)
        matrix(f"ffn.{j}.down", ffn["down"], hidden, inter)
    if meta["head"]["kind"] == "packed":
        matrix("head", meta["head"], vocab, hidden)
    else:
        expect("head.bf16", vocab * hidden * 2)
    embed = "embed.bf16" if "embed.bf16" in entries else "embed.f32"
    expect(embed, vocab * hidden * (2 if embed == "embed.bf16" else 4))
    expect("rope.cos", positions * D * 4)
    expect("rope.sin", positions * D * 4)


class Buffer:
    """``nbytes`` of memory at a fixed address for the C code: anonymous pages (zeroed by the OS), 2 MB
    aligned and advised as huge pages when large (as the default runtime packs its weights: a whole
    decode's matmuls ran ~16% faster than on 4 KB pages)."""

    def __init__(self, nbytes: int, *, huge: bool = False) -> None:
        pad = HUGE_PAGE if huge and nbytes >= HUGE_PAGE else 0
        # private: Python's default for anonymous maps is shared memory, which Linux backs with huge
        # pages only if shmem THP is on (it is off by default): the 0.5b decode ran ~25% slower so
        self._map = mmap.mmap(-1, max(1, nbytes + pad), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.start = -base % HUGE_PAGE if pad else 0
        self.address, self.nbytes = base + self.start, nbytes
        if pad and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE, self.start, nbytes // mmap.PAGESIZE * mmap.PAGESIZE)

    def view(self) -> memoryview:
        return memoryview(self._map)[self.start : self.start + self.nbytes]


def _floats(data: bytes | bytearray) -> tuple[bytearray, int]:
    """A writable copy of float32 bytes and its address."""
    buffer = bytearray(data)
    return buffer, ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class LeanModel:
    """A quantized checkpoint's kernel image, ready to decode (batch 1, greedy).

    ``LeanModel.open(CKPT)`` writes the image if needed and loads it; :meth:`prefill` runs a prompt into
    the cache and returns the last position's logits, :meth:`decode` one token at the next slot,
    :meth:`greedy` both until ``max_new_tokens`` or a stop id. Logits are ``array.array("f")`` of
    ``vocab`` floats (``numpy.frombuffer(logits, numpy.float32)`` views them without a copy).
    """

    def __init__(self, image: str | Path, threads: int | None = None) -> None:
        # The same image runs on either build of the kernels (same packed layout); pick this CPU's.
        self.isa = _kernel_isa()
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
        self._decode_layers = clib.kernel("mb_decode_layers", self.isa)
        self._prefill_layers = clib.kernel("mb_prefill_layers", self.isa)
        self._rmsnorm = clib.kernel("mb_rmsnorm", self.isa)
        self._qmat_gemv = clib.kernel("mb_qmat_gemv", self.isa)
        self._bf16_gemv = clib.kernel("mb_bf16_gemv", self.isa)
        with open(self.path, "rb") as f:
            read = {n: self._read(f, e) for n, e in entries.items() if not n.startswith(("embed", "rope"))}
        self._buffers = list(read.values())  # the C structs hold their addresses
        self.weight_bytes = sum(b.nbytes for b in self._buffers)
        # Embedding and rotary rows: plain reads when needed, never mapped (see the module doc).
        self._file = open(self.path, "rb")  # noqa: SIM115 - open for the model's lifetime
        self.embed_bf16 = "embed.bf16" in entries
        self._embed = entries["embed.bf16" if self.embed_bf16 else "embed.f32"]
        self._rope = (entries["rope.cos"], entries["rope.sin"])
        self.norm = read["norm"].address
        self.layers = (clib.DecodeLayer * len(m["layers"]))()
        for i, spec in enumerate(m["layers"]):
            layer = self.layers[i]
            layer.norm1, layer.norm2 = read[f"layer.{i}.norm1"].address, read[f"layer.{i}.norm2"].address
            layer.norm_bf16, layer.eps1, layer.eps2 = 0, spec["eps1"], spec["eps2"]
            layer.qkv = _qmatrix(read, f"layer.{i}.qkv", spec["qkv"])
            layer.o = _qmatrix(read, f"layer.{i}.o", spec["o"])
            ffn = m["ffns"][str(spec["ffn"])]
            layer.gate_up = _qmatrix(read, f"ffn.{spec['ffn']}.gate_up", ffn["gate_up"])
            layer.down = _qmatrix(read, f"ffn.{spec['ffn']}.down", ffn["down"])
        self.head = m["head"]
        self.head_matrix = _qmatrix(read, "head", self.head) if self.head["kind"] == "packed" else None
        self.head_bf16 = read["head.bf16"].address if self.head["kind"] == "bf16" else None
        self.cache_bf16 = m["cache"] == "bf16"
        self.cache_len = self.position = self.limit = 0
        self._h, self._h_at = _floats(bytes(4 * self.hidden))  # the final norm's output

    @classmethod
    def open(cls, checkpoint: str | Path, threads: int | None = None, *, quiet: bool = False) -> LeanModel:
        return cls(ensure_image(checkpoint, quiet=quiet), threads)

    def close(self) -> None:
        """Close the image file (embedding rows are read from it); the model cannot decode after this."""
        self._file.close()

    def __enter__(self) -> LeanModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- loading ---------------------------------------------------------------------------------
    def _read(self, f, e: TensorEntry) -> Buffer:
        buffer = Buffer(e.nbytes, huge=True)
        f.seek(e.offset)
        if f.readinto(buffer.view()) != e.nbytes:
            raise MobiLlamaError(f"{self.path}: cut short (truncated file?)")
        return buffer

    def _row_bytes(self, e: TensorEntry, index: int, count: int = 1) -> bytes:
        """The bytes of rows ``index .. index+count-1`` of the 2-D tensor ``e``, read from the file."""
        row = e.nbytes // e.shape[0]
        data = os.pread(self._file.fileno(), row * count, e.offset + index * row)
        if len(data) != row * count:
            raise MobiLlamaError(f"{self.path}: cut short (truncated file?)")
        return data

    # ---- decoding --------------------------------------------------------------------------------
    def start(self, total_len: int) -> None:
        """A fresh cache for a request of ``total_len`` tokens (prompt plus new ones)."""
        if not isinstance(total_len, int) or not 1 <= total_len <= self.max_positions:
            raise MobiLlamaError(
                f"{total_len!r} tokens do not fit the model's context of {self.max_positions}"
            )
        H, Hkv, D = self.heads
        length = min(self.max_positions, -(-total_len // 64) * 64)
        if length != self.cache_len:
            size = Hkv * length * D * (2 if self.cache_bf16 else 4)
            self._cache = [(Buffer(size), Buffer(size)) for _ in range(len(self.layers))]
            for layer, (k, v) in zip(self.layers, self._cache, strict=True):
                layer.k_cache, layer.v_cache = k.address, v.address
            self.cache_len = length
        # this request's rotary rows (a few KB), read once
        (self._cos, self._cos_at), (self._sin, self._sin_at) = (
            _floats(self._row_bytes(e, 0, total_len)) for e in self._rope
        )
        self.limit, self.position = total_len, 0

    def _rows(self, ids: Sequence[int]) -> tuple[bytearray, int]:
        """The embedding rows of ``ids`` as contiguous fp32 [len(ids), hidden] and its address."""
        try:
            ids = [operator.index(t) for t in ids]
        except TypeError:
            raise MobiLlamaError(f"token ids must be integers, got {list(ids)[:8]!r}") from None
        for t in ids:
            if not 0 <= t < self.vocab:
                raise MobiLlamaError(f"token id {t} is outside the vocabulary (0..{self.vocab - 1})")
        data = b"".join(self._row_bytes(self._embed, t) for t in ids)
        if not self.embed_bf16:
            return _floats(data)
        out, at = _floats(bytes(2 * len(data)))
        src = ctypes.create_string_buffer(data, len(data))
        self.lib.mb_bf16_to_f32(src, len(data) // 2, at)
        return out, at

    def _advance(self, n: int) -> int:
        first = self.position
        if n < 1 or first + n > self.limit:
            raise MobiLlamaError(f"{first + n} tokens exceed this request's {self.limit} (see start())")
        self.position += n
        return first

    def prefill(self, ids: Sequence[int]) -> array.array:
        """Run prompt ``ids`` into the next cache slots; fp32 logits of its last token [vocab]."""
        x, at = self._rows(ids)  # x keeps the rows alive while the C code updates them in place
        first = self._advance(len(ids))
        H, Hkv, D = self.heads
        row = 4 * D
        rc = self._prefill_layers(
            at, len(ids), self.hidden, ctypes.addressof(self.layers), len(self.layers),
            self._cos_at + first * row, self._sin_at + first * row, self.cache_len, first,
            self.cache_bf16, H, Hkv, D, self.intermediate, D**-0.5, self.threads,
        )  # fmt: skip
        if rc:
            raise MemoryError("prefill: could not allocate its activation buffers")
        return self._logits(at + (len(ids) - 1) * 4 * self.hidden)

    def decode(self, token: int) -> array.array:
        """Feed one token at the next cache slot; fp32 logits [vocab]."""
        x, at = self._rows([token])  # x keeps the row alive while the C code updates it in place
        slot = self._advance(1)
        H, Hkv, D = self.heads
        rc = self._decode_layers(
            at, 1, self.hidden, ctypes.addressof(self.layers), len(self.layers),
            self._cos_at + slot * 4 * D, self._sin_at + slot * 4 * D, self.cache_len, slot, None,
            self.cache_bf16, H, Hkv, D, self.intermediate, D**-0.5, self.threads,
        )  # fmt: skip
        if rc:
            raise MemoryError("decode step: could not allocate its activation buffers")
        return self._logits(at)

    def _logits(self, x_at: int) -> array.array:
        """The final norm and the LM head on the hidden row at address ``x_at``."""
        self._rmsnorm(x_at, 1, self.hidden, self.norm, 0, self.meta["final_eps"], self._h_at)
        logits = array.array("f", bytes(4 * self.vocab))
        out = logits.buffer_info()[0]
        if self.head_matrix is not None:
            rc = self._qmat_gemv(
                ctypes.byref(self.head_matrix), self._h_at, 1, self.hidden, out, self.threads
            )
            if rc:
                raise MemoryError("LM head: could not allocate its activation buffers")
        else:
            self._bf16_gemv(self._h_at, 1, self.hidden, self.head_bf16, self.vocab, out, self.threads)
        return logits

    def argmax(self, logits: array.array) -> int:
        """The id of the largest logit (the first on a tie)."""
        return int(self.lib.mb_argmax(logits.buffer_info()[0], len(logits)))

    def sample(
        self, logits: array.array, params: SamplingParams, draw: random.Random, seen: set[int] = frozenset()
    ) -> int:
        """The next token from ``logits`` under ``params``: the repetition penalty on
        the ``seen`` ids, then the argmax (temperature 0) or a draw (``mb_sample``) with ``draw``'s next
        number. ``logits`` is changed in place."""
        if params.repetition_penalty != 1.0:
            penalty = params.repetition_penalty
            for t in seen:
                value = logits[t]
                logits[t] = value / penalty if value > 0 else value * penalty
        if params.greedy:
            return self.argmax(logits)
        at, n = logits.buffer_info()
        token = self.lib.mb_sample(at, n, params.temperature, params.top_k, params.top_p, draw.random())
        if token == -2:
            raise MemoryError("sampling: could not allocate its candidate buffer")
        if token < 0:
            raise MobiLlamaError(f"sampling: bad parameters {params!r}")
        return int(token)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """The greedy continuation of prompt ``ids``: at most ``max_new_tokens`` ids, ending at a stop id."""
        if not ids:
            raise MobiLlamaError("the prompt is empty: give at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MobiLlamaError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.start(len(ids) + max_new_tokens)
        out = [self.argmax(self.prefill(ids))]
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            out.append(self.argmax(self.decode(out[-1])))
        return out


def _qmatrix(read: dict[str, Buffer], name: str, spec: dict) -> clib.QMatrix:
    w, p = read[f"{name}.w"], read[f"{name}.p"]
    return clib.QMatrix(w.address, p.address, spec["n"], spec["group"], spec["per"], spec["bits"], spec["ab"])


def lean_generate(
    model: LeanModel,
    tokenizer: Any,
    prompt: str,
    params: SamplingParams | None = None,
    *,
    on_text: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The completion of ``prompt`` under ``params`` (or ``SamplingParams(**options)``: max_new_tokens,
    temperature, top_k, top_p, repetition_penalty, stop, seed): greedy at temperature 0, else sampled as the
    default runtime samples (``seed`` makes a draw reproducible), ended as the default runtime's generator
    ends it: a stop token (the tokenizer's end-of-text / end-of-turn ids; counted, but not in the text), a
    stop string (cut off), or ``max_new_tokens`` / the context. ``on_text`` receives the text as it becomes
    final (an incomplete UTF-8 character or a possible stop-string prefix waits). Returns the fields of the
    default runtime's completion: text, token_ids, finish_reason, prompt_tokens, completion_tokens,
    stop_token."""
    from mobillama.infer.sampling import SamplingParams
    from mobillama.infer.stops import TextRow
    from mobillama.tokenizer import encode_prompt, stop_ids

    if params is None:
        params = SamplingParams(**options)
    elif options:
        raise TypeError(f"lean_generate: give params or options, not both ({', '.join(options)})")
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise MobiLlamaError("the prompt is empty: give at least one token")
    new = min(params.max_new_tokens, model.max_positions - len(ids))
    if new < 1:
        raise MobiLlamaError(
            f"the prompt's {len(ids)} tokens fill the model's context of {model.max_positions}"
        )
    stops = frozenset(stop_ids(tokenizer))
    draw = random.Random(params.seed)
    seen = set(ids)  # the repetition penalty counts the prompt's tokens and every new one
    model.start(len(ids) + new)
    logits = model.prefill(ids)
    row = TextRow(prompt_tokens=len(ids))
    for step in range(new):
        token = model.sample(logits, params, draw, seen)
        seen.add(token)
        delta = row.advance(token, stops, params.stop, tokenizer.decode, last=step == new - 1)
        if on_text is not None and delta:
            on_text(delta)
        if row.finish_reason is not None:
            break
        logits = model.decode(token)
    return {
        "text": row.text, "token_ids": row.ids, "finish_reason": row.finish_reason, "prompt_tokens": len(ids),
        "completion_tokens": row.generated, "stop_token": row.stop_token,
    }  # fmt: skip


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
    rng = random.Random(seed)
    prompt = [rng.randrange(3, model.vocab) for _ in range(prompt_len)]

    def one_run(length: int, steps: int) -> tuple[float, float]:
        model.start(length + steps)
        t0 = time.perf_counter()
        token = model.argmax(model.prefill(prompt[:length]))
        t1 = time.perf_counter()
        for _ in range(steps - 1):
            token = model.argmax(model.decode(token))
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
        "kernel_used": model.isa,
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
        "numpy_imported": "numpy" in sys.modules,
    }


def format_lean_bench(r: dict[str, Any]) -> str:
    """A small human-readable table of one :func:`lean_bench` result."""
    mb = 1 << 20
    rows = [
        (
            "model",
            f"{r['model']} (lean runtime, {r['kernel_used']} kernel; imported torch: {r['torch_imported']}, "
            f"numpy: {r['numpy_imported']})",
        ),
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
