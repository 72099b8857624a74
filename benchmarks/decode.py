"""Decode speed next to quality: this project against llama.cpp (and transformers), in one run.

Two groups, each run in interleaved rounds (every row once per round, one after another, each in its own
process: clean peak-RSS figures, no allocator carry-over), batch 1, greedy, the same thread count:

- ``--shape 0.5b``: the ``mobillama-0.5b`` shape on seeded random weights (speed does not depend on the
  values). This project (``mobillama bench`` on a bf16 checkpoint and its ``mobillama quantize`` int8 /
  int4 g128 / int4 g32 versions, with the kernel ``auto`` picks and the stock ones; int4 g32 also with
  its scales as half floats, ``--int4-params half``, the layout before 8-bit codes; int8 and both int4
  also with the FFN duplicated per layer, to see whether sharing speeds decode); llama.cpp's ``llama-bench`` on
  Q4_0 and Q8_0 files written by ``export_gguf`` from the same checkpoint (GGUF has no shared tensors: the
  FFN is stored 22 times); transformers ``LlamaForCausalLM.generate`` in bf16 with PyTorch defaults and
  with oneDNN off (``--no-transformers`` skips them). Random weights have no perplexity.
- ``--shape real``: SmolLM2-135M-Instruct (``mobillama fetch``, cached). This project in bf16, int8 and
  int4 (group 32, the default; head float, int8 or int4) from ``mobillama quantize`` (whose "auto" keeps
  this Q4_1 import's half-float grid exactly; the "codes" rows force 8-bit codes, the layout the 0.5b
  rows run, to show its quality; "int8 head per 32" has a scale per 32 columns, llama.cpp's Q8_0 grid,
  ``--int8-group-size 32``, which reproduces the shipped file's embedding); llama.cpp on the shipped Q4_1 file and on Q8_0
  and Q4_0 made by ``llama-quantize`` from this project's F16 export, so both tools quantize the same
  weights. Every row also gets its perplexity on the same real text (Python's ``pydoc_data.topics``, as
  ``benchmarks/real_quality.py``), ``--perplexity-windows`` windows of 512 tokens scored the way
  ``llama-perplexity`` does: ``mobillama bench --perplexity-text`` for this project, ``llama-perplexity``
  for llama.cpp (both once, in the first round, after the timing; perplexity does not vary between runs).

Both groups also have rows on the lean runtime (``mobillama bench --lean``: the same kernels and decode
steps in a process that never imports PyTorch); such a row's perplexity is its default-runtime twin's
(same checkpoint, same steps), and the kernel images it writes are deleted at the end.

Ratios ("x ref") are the median of per-round ratios of decode (and prefill) tok/s against the reference
row of the same group: the fastest llama.cpp row of comparable quality in that run. Comparable means:
where both rows have a perplexity, a llama.cpp row at most 1% worse than this row (so no row is
flattered by a less accurate peer; if every llama.cpp row is worse, the most accurate one); otherwise
the same precision class (bf16/int8 against Q8_0, int4 against Q4_0/Q4_1). Without llama.cpp the
reference is transformers with oneDNN off. llama.cpp rows are skipped, saying why, where its tools are
not built (``bash scripts/build_llama_cpp.sh``).

What is compared: llama-bench's ``pp`` (prefill of a ``--prompt-len`` prompt) and ``tg`` (``--new-tokens``
decoded from an empty context); this project's prefill and its decode after the prompt. Peak RSS: for
this project the decode run's own peak ("run", the kernel's peak mark reset after loading) and the
whole process's ("max", loading included); llama-bench reports no separate steady state, so its row has
the whole process's peak only (the tool's own ``ru_maxrss``).

``--isa avx2`` runs everything as on a CPU with AVX2 but no AVX-512 (most laptops): this project's AVX2
kernels and decode step, PyTorch limited to AVX2, against llama.cpp's AVX2 build
(``LLAMA_CPP_ISA=avx2 bash scripts/build_llama_cpp.sh``); the lean rows run the lean runtime on the
AVX2 kernels.

The machine is shared: only ratios measured in one run mean anything. The load average is printed.

    python benchmarks/decode.py [--shape 0.5b|real|both] [--rounds 3] [--isa native|avx2] [--threads 2] [--prompt-len 128]
        [--new-tokens 128] [--perplexity-windows 4] [--no-llama-cpp] [--no-transformers] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRESET = "mobillama-0.5b"
REAL = "smollm2-135m-instruct"
COMPARABLE_PPL = 1.01  # a llama.cpp row at most 1% worse in perplexity counts as comparable quality

# (label, which checkpoint, extra `mobillama bench` arguments, precision class). The 0.5b checkpoints hold
# the preset's seeded random weights: "bf16" as saved, the others written by `mobillama quantize` from it,
# so every variant loads its weights the way a user's would. "auto" kernels: the table says which ran.
VARIANTS_05B = [
    ("mobillama bf16", "bf16", [], "8"),
    ("mobillama int8", "int8", [], "8"),
    ("mobillama int8, FFN x22", "int8", ["--duplicate-ffn"], "8"),
    ("mobillama int8 fbgemm dynamic", "int8", ["--int8-kernel", "dynamic"], "8"),
    ("mobillama int4 g128", "int4g128", [], "4"),
    ("mobillama int4 g128, FFN x22", "int4g128", ["--duplicate-ffn"], "4"),
    ("mobillama int4 g128 stock", "int4g128", ["--int4-kernel", "stock"], "4"),
    ("mobillama int4 g32", "int4g32", [], "4"),
    ("mobillama int4 g32, FFN x22", "int4g32", ["--duplicate-ffn"], "4"),
    ("mobillama int4 g32, half-float params", "int4g32-half", [], "4"),
    ("mobillama int8, lean runtime", "int8", ["--lean"], "8"),
    ("mobillama int4 g32, lean runtime", "int4g32", ["--lean"], "4"),
]
VARIANTS_REAL = [
    ("mobillama bf16", "bf16", [], "8"),
    ("mobillama int8 (head quantized)", "int8-qhead", [], "8"),
    ("mobillama int8 (float head, default)", "int8-keep-head", [], "8"),
    ("mobillama int4 g32 (head quantized)", "int4g32-qhead", [], "4"),
    ("mobillama int4 g32 (float head, default)", "int4g32-keep-head", [], "4"),
    ("mobillama int4 g32 (int8 head)", "int4g32-head8", [], "4"),
    ("mobillama int8 (float head), lean runtime", "int8-keep-head", ["--lean"], "8"),
    ("mobillama int4 g32 (float head), lean runtime", "int4g32-keep-head", ["--lean"], "4"),
    ("mobillama int4 g32 (int8 head), lean runtime", "int4g32-head8", ["--lean"], "4"),
    ("mobillama int4 g32 (int8 head per 32)", "int4g32-head8g32", [], "4"),
    ("mobillama int4 g32 (int8 head per 32), lean runtime", "int4g32-head8g32", ["--lean"], "4"),
    ("mobillama int4 g32 codes (int8 head per 32)", "int4g32-codes-head8g32", [], "4"),
    ("mobillama int4 g32 codes (int8 head per 32), lean runtime", "int4g32-codes-head8g32", ["--lean"], "4"),
]
QUANTIZE = {
    "int8": ["--bits", "8"],
    "int4g128": ["--bits", "4", "--group-size", "128"],
    "int4g32": ["--bits", "4", "--group-size", "32"],
    "int4g32-half": ["--bits", "4", "--group-size", "32", "--int4-params", "half"],
    "int4g32-head8g32": ["--bits", "4", "--group-size", "32", "--head-bits", "8", "--int8-group-size", "32"],
    "int4g32-codes-head8g32": [
        "--bits",
        "4",
        "--group-size",
        "32",
        "--head-bits",
        "8",
        "--int8-group-size",
        "32",
        "--int4-params",
        "codes",
    ],
    "int8-qhead": ["--bits", "8", "--quantize-head"],
    "int4g32-qhead": ["--bits", "4", "--group-size", "32", "--quantize-head"],
    "int8-keep-head": ["--bits", "8", "--keep-head"],
    "int4g32-keep-head": ["--bits", "4", "--group-size", "32", "--keep-head"],
    "int4g32-head8": ["--bits", "4", "--group-size", "32", "--head-bits", "8"],
}
LLAMA_CPP_CLASS = {"F16": "8", "Q8_0": "8", "Q4_0": "4", "Q4_1": "4"}


@dataclass
class Row:
    """One line of the table: ``measure(first_round)`` returns its figures (or ``{"error": ...}``)."""

    label: str
    tool: str  # "mobillama", "llama.cpp" or "transformers"
    klass: str  # precision class, "8" (bf16/int8/Q8_0) or "4"
    measure: Callable[[bool], dict]
    results: list[dict] = field(default_factory=list)
    # a lean-runtime row: the default-runtime row of the same checkpoint, whose perplexity is this row's
    # too (the lean runtime computes the same decode steps; `bench --lean` scores no text itself)
    twin: Row | None = None


def quantize_checkpoints(src: str, root: str, names: list[str]) -> dict[str, str]:
    """``mobillama quantize`` of ``src`` into ``root/NAME`` for each of ``names`` (see ``QUANTIZE``)."""
    dirs = {"bf16": src}
    for name in names:
        dirs[name] = os.path.join(root, name)
        cmd = ["-m", "mobillama", "quantize", src, *QUANTIZE[name], "--out", dirs[name]]
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise SystemExit(f"quantize failed: {proc.stderr.strip()}")
    return dirs


def write_checkpoints(root: str) -> dict[str, str]:
    """The 0.5b preset's seeded weights as a bf16 checkpoint and its int8 / int4 quantizations."""
    from mobillama.checkpoint import save_checkpoint
    from mobillama.infer.load import load_for_inference

    model = load_for_inference(PRESET, dtype="bf16", seed=0)
    save_checkpoint(model.state_dict(), model.config, os.path.join(root, "bf16"))
    del model
    return quantize_checkpoints(
        os.path.join(root, "bf16"), root, ["int8", "int4g128", "int4g32", "int4g32-half"]
    )


def run_peer(mkldnn: bool, threads: int, prompt_len: int, new_tokens: int) -> dict:
    """transformers generate on LlamaForCausalLM carrying this project's seeded 0.5b weights."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mobillama.convert.to_llama import llama_config
    from mobillama.infer.bench import measure_read_bandwidth
    from mobillama.infer.lean import reset_peak_rss, status_kb
    from mobillama.infer.load import load_for_inference

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    ours = load_for_inference(PRESET, dtype="bf16", seed=0)
    c = ours.config
    cfg = llama_config(c, torch.bfloat16)  # the exporter's mapping: one definition of the Llama twin
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    for layer in llama.model.layers:
        layer.mlp = llama.model.layers[0].mlp  # one MLP object, as in MobiLlama
    state = {k.replace("model.ffns.0.", "model.layers.0.mlp."): v for k, v in ours.state_dict().items()}
    llama.load_state_dict(state, strict=False, assign=True)
    llama.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    llama.eval()
    del ours, state
    weight_bytes = sum(p.numel() * p.element_size() for p in llama.parameters())
    ids = torch.randint(3, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        llama.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        reset_peak_rss()
        t0 = time.perf_counter()
        llama.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = llama.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens
    decode = (new_tokens - 1) / (total - ttft)
    bw = measure_read_bandwidth()
    return {
        "decode_tok_s": decode,
        "prefill_tok_s": prompt_len / ttft,
        "ttft_s": ttft,
        "model_bytes": weight_bytes,
        "peak_rss_bytes": status_kb("VmHWM") * 1024,
        "roofline_gb_s": bw,
    }


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in [os.path.abspath("src"), os.environ.get("PYTHONPATH", "")] if p
        ),
    }


def subprocess_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        }
    return json.loads(proc.stdout)


def use_avx2_only() -> None:
    """This process and its subprocesses as on a CPU with AVX2 but no AVX-512: the project's kernels,
    PyTorch's and oneDNN's, and llama.cpp's AVX2 build (unless MOBILLAMA_LLAMA_CPP names another)."""
    from mobillama.eval import llama_cpp

    os.environ.update(MOBILLAMA_KERNEL_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    cache = Path(os.environ.get("MOBILLAMA_CACHE", "~/.cache/mobillama")).expanduser()
    avx2_bin = cache / "llama.cpp" / f"{llama_cpp.LLAMA_CPP_PYTHON_VERSION}-avx2" / "bin"
    os.environ.setdefault("MOBILLAMA_LLAMA_CPP", str(avx2_bin))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mobillama_row(
    label: str, ckpt: str, extra: list[str], klass: str, common: list[str], ppl: list[str]
) -> Row:
    """``mobillama bench CKPT --json`` in a subprocess; with ``ppl`` (``--perplexity-text ...``) in the
    first round only."""

    def measure(first: bool) -> dict:
        return subprocess_json(
            ["-m", "mobillama", "bench", ckpt, "--json", *common, *extra, *(ppl if first else [])]
        )

    return Row(label, "mobillama", klass, measure)


def link_lean_twins(rows: list[Row], variants: list[tuple]) -> None:
    """Point each lean-runtime row at the default-runtime row of the same checkpoint (see Row.twin)."""
    default = {src: row for row, (_, src, extra, _) in zip(rows[-len(variants) :], variants) if not extra}
    for row, (_, src, extra, _) in zip(rows[-len(variants) :], variants, strict=True):
        if "--lean" in extra:
            row.twin = default.get(src)


def llama_cpp_row(
    label: str, gguf: Path, klass: str, args: argparse.Namespace, text_file: Path | None
) -> Row:
    """``llama-bench`` (one repetition per round: the rounds are the repetitions) and, in the first round
    and where there is a text, ``llama-perplexity`` on it."""
    from mobillama.errors import MobiLlamaError
    from mobillama.eval import llama_cpp

    def measure(first: bool) -> dict:
        try:
            r = llama_cpp.bench(gguf, threads=args.threads, n_prompt=args.prompt_len, n_gen=args.new_tokens)
            r["model_bytes"] = r.get("model_size", gguf.stat().st_size)
            if first and text_file is not None:
                r["perplexity"] = llama_cpp.perplexity(
                    gguf, text_file, threads=args.threads, chunks=args.perplexity_windows
                )
            return r
        except MobiLlamaError as e:
            return {"error": str(e)}

    return Row(label, "llama.cpp", klass, measure)


def llama_cpp_missing(args: argparse.Namespace) -> str | None:
    """Why the llama.cpp rows are skipped, or None when they run."""
    if args.no_llama_cpp:
        return "--no-llama-cpp"
    from mobillama.eval import llama_cpp

    return None if llama_cpp.tools_dir() is not None else f"llama.cpp tools not built; {llama_cpp.BUILD_HINT}"


def group_05b(args: argparse.Namespace, root: str, common: list[str]) -> list[Row]:
    from mobillama.convert import export_gguf

    checkpoints = write_checkpoints(root)
    print("0.5b checkpoints written", file=sys.stderr)
    rows: list[Row] = []
    if not args.no_transformers:
        for label, mode in (
            ("transformers bf16 (defaults)", "default"),
            ("transformers bf16 (mkldnn off)", "tuned"),
        ):
            rows.append(
                Row(
                    label,
                    "transformers",
                    "8",
                    lambda _first, m=mode: subprocess_json([__file__, "--peer", m, *common]),
                )
            )
    for label, source, extra, klass in VARIANTS_05B:
        rows.append(mobillama_row(label, checkpoints[source], extra, klass, common, []))
    link_lean_twins(rows, VARIANTS_05B)
    if llama_cpp_missing(args) is None:
        for qtype in ("Q4_0", "Q8_0"):
            gguf = Path(root) / f"0.5b-{qtype}.gguf"
            export_gguf(checkpoints["bf16"], gguf, gguf_type=qtype.lower())
            rows.append(
                llama_cpp_row(f"llama.cpp {qtype} (FFN x22)", gguf, LLAMA_CPP_CLASS[qtype], args, None)
            )
        print("0.5b GGUF files written", file=sys.stderr)
    return rows


def group_real(args: argparse.Namespace, root: str, common: list[str]) -> list[Row]:
    from mobillama.convert import export_gguf
    from mobillama.convert.fetch import cached_real_model
    from mobillama.eval import llama_cpp
    from mobillama.eval.perplexity import reference_text  # the text benchmarks/real_quality.py scores

    gguf_file, ckpt = cached_real_model(REAL)
    text_file = Path(root) / "real_text.txt"
    text_file.write_text(reference_text(40_000 * max(1, args.perplexity_windows // 4)), encoding="utf-8")
    ppl = ["--perplexity-text", str(text_file), "--perplexity-windows", str(args.perplexity_windows)]
    names = sorted({src for _, src, _, _ in VARIANTS_REAL} - {"bf16"})
    checkpoints = quantize_checkpoints(str(ckpt), os.path.join(root, "real"), names)
    rows = [
        mobillama_row(label, checkpoints[src], extra, klass, common, [] if "--lean" in extra else ppl)
        for label, src, extra, klass in VARIANTS_REAL
    ]
    link_lean_twins(rows, VARIANTS_REAL)
    if llama_cpp_missing(args) is None:
        f16 = Path(root) / "real-F16.gguf"
        export_gguf(ckpt, f16, gguf_type="f16")
        rows.append(llama_cpp_row("llama.cpp Q4_1 (shipped file)", Path(gguf_file), "4", args, text_file))
        for qtype in ("Q8_0", "Q4_0"):
            gguf = llama_cpp.quantize(f16, Path(root) / f"real-{qtype}.gguf", qtype, threads=args.threads)
            rows.append(
                llama_cpp_row(f"llama.cpp {qtype} (from F16)", gguf, LLAMA_CPP_CLASS[qtype], args, text_file)
            )
    print("real-model files written", file=sys.stderr)
    return rows


def _ok(row: Row) -> list[dict]:
    return [r for r in row.results if "error" not in r]


def _ppl(row: Row) -> float | None:
    own = next((r["perplexity"]["perplexity"] for r in _ok(row) if "perplexity" in r), None)
    return own if own is not None or row.twin is None else _ppl(row.twin)


def reference(row: Row, rows: list[Row]) -> Row | None:
    """The fastest llama.cpp row of comparable quality (see the module doc), else transformers tuned."""
    peers = [r for r in rows if r.tool == "llama.cpp" and _ok(r)]
    if not peers:
        return next((r for r in rows if r.label == "transformers bf16 (mkldnn off)" and _ok(r)), None)
    mine = _ppl(row)
    if mine is not None and all(_ppl(p) is not None for p in peers):
        good = [p for p in peers if _ppl(p) <= mine * COMPARABLE_PPL]
        if not good:
            return min(peers, key=_ppl)
    else:
        good = [p for p in peers if p.klass == row.klass] or peers
    return max(good, key=lambda p: median([r["decode_tok_s"] for r in _ok(p)]))


def ratios(row: Row, ref: Row, key: str) -> list[float]:
    """Per-round ratios of ``key`` (rounds where both rows ran)."""
    return [
        a[key] / b[key]
        for a, b in zip(row.results, ref.results, strict=True)
        if "error" not in a and "error" not in b
    ]


def print_table(title: str, rows: list[Row]) -> None:
    """Medians over rounds; ratios are taken within each round (same machine state), then the median."""
    print(f"\n{title}\n")
    print(
        "| row | kernel | decode tok/s | x ref | x ref per round | prefill tok/s | x ref | "
        "peak RSS MB run / max | GB/s FFN re-read / unique | perplexity | reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    refs = {id(row): reference(row, rows) for row in rows if row.tool != "llama.cpp"}
    referenced = {id(ref) for ref in refs.values() if ref is not None}
    for row in rows:
        runs = _ok(row)
        if not runs:
            print(f"| {row.label} | error: {row.results[0].get('error', '?')[:150]} ||||||||||")
            continue
        ref = refs.get(id(row))  # llama.cpp rows are the references, not compared among themselves
        is_ref = id(row) in referenced
        dec = ratios(row, ref, "decode_tok_s") if ref is not None and ref is not row else []
        pre = ratios(row, ref, "prefill_tok_s") if ref is not None and ref is not row else []
        kernel = runs[0].get("kernel_used") or ("ggml" if row.tool == "llama.cpp" else "-")
        rss_run = median([r["peak_rss_bytes"] for r in runs]) / 1e6
        if row.tool == "mobillama":
            rss_max = median([max(r["peak_rss_bytes"], r["load_peak_rss_bytes"]) for r in runs]) / 1e6
            rss = f"{rss_run:.0f} / {rss_max:.0f}"
        elif row.tool == "llama.cpp":
            rss = f"- / {rss_run:.0f}"
        else:
            rss = f"{rss_run:.0f} / -"
        ppl = _ppl(row)
        ppl_text = "-" if ppl is None else f"{ppl:.3f}" + (" (same steps)" if row.twin is not None else "")
        # achieved bandwidth: tok/s x bytes per token, the shared FFN counted per layer and once
        gb_s = "-"
        if row.tool == "mobillama" and "achieved_gb_s" in runs[0]:
            gb_s = (
                f"{median([r['achieved_gb_s'] for r in runs]):.1f} / "
                f"{median([r['achieved_unique_gb_s'] for r in runs]):.1f}"
            )
        mark = "(ref)" if is_ref else "-"
        print(
            f"| {row.label} | {kernel} | {median([r['decode_tok_s'] for r in runs]):.2f} | "
            f"{f'{median(dec):.2f}' if dec else mark} | {' '.join(f'{x:.2f}' for x in dec) or '-'} | "
            f"{median([r['prefill_tok_s'] for r in runs]):.1f} | {f'{median(pre):.2f}' if pre else mark} | "
            f"{rss} | {gb_s} | {ppl_text} | "
            f"{ref.label if ref is not None and ref is not row else '-'} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shape",
        choices=["0.5b", "real", "both"],
        default="both",
        help="which group runs: the mobillama-0.5b shape (random weights), the real "
        "SmolLM2-135M-Instruct (with perplexity), or both (default)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every row")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (llama-bench -p)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (llama-bench -n)")
    p.add_argument(
        "--perplexity-windows",
        type=int,
        default=4,
        help="512-token windows of the real text scored per real-model row (default 4)",
    )
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers rows (0.5b group)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, one after another per round, and report medians "
        "(ratios are taken within a round); the machine's speed drifts, so 3 or more is advisable",
    )
    p.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: run as on a CPU without AVX-512 - this project's AVX2 kernels (MOBILLAMA_KERNEL_ISA=avx2; "
        "PyTorch and oneDNN limited to AVX2 too; the lean rows on the AVX2 kernels) against "
        "llama.cpp's AVX2 build (LLAMA_CPP_ISA=avx2 bash scripts/build_llama_cpp.sh)",
    )
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--peer", choices=["default", "tuned"], help=argparse.SUPPRESS)  # internal: one peer run
    args = p.parse_args()
    if args.peer:
        print(json.dumps(run_peer(args.peer == "default", args.threads, args.prompt_len, args.new_tokens)))
        return 0
    if args.isa == "avx2":
        use_avx2_only()
    common = [
        "--threads",
        str(args.threads),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
    ]
    workdir = tempfile.TemporaryDirectory(prefix="mobillama-decode-")
    skipped = llama_cpp_missing(args)
    if skipped:
        print(f"llama.cpp rows skipped: {skipped}")
    groups: dict[str, list[Row]] = {}
    if args.shape in ("0.5b", "both"):
        groups[f"{PRESET} (random weights)"] = group_05b(args, workdir.name, common)
    if args.shape in ("real", "both"):
        groups[f"{REAL} (real weights; perplexity on {args.perplexity_windows} windows of 512 tokens)"] = (
            group_real(args, workdir.name, common)
        )
    load_before = os.getloadavg()
    t0 = time.time()
    for number in range(1, args.rounds + 1):
        for rows in groups.values():
            for row in rows:
                row.results.append(row.measure(number == 1))
                print(f"round {number}: done {row.label}", file=sys.stderr)
    load_after = os.getloadavg()
    workdir.cleanup()
    for rows in groups.values():  # the lean rows' kernel images of this run's temporary checkpoints
        for image in {r["image"] for row in rows for r in _ok(row) if "image" in r}:
            Path(image).unlink(missing_ok=True)
    for title, rows in groups.items():
        print_table(
            f"{title}: batch 1, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
            f"{'AVX2 only (no AVX-512), ' if args.isa == 'avx2' else ''}"
            f"greedy; median of {args.rounds} round(s), every row once per round",
            rows,
        )
    print(
        f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; rounds took "
        f"{time.time() - t0:.0f} s (vCPUs shared with others)"
    )
    if args.json:
        out = {
            title: {r.label: {"tool": r.tool, "class": r.klass, "rounds": r.results} for r in rows}
            for title, rows in groups.items()
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"groups": out, "load_before": load_before, "load_after": load_after}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
