"""Training checkpoints: save, verify, list, prune and resume (the LLM360 lineage promise).

A training checkpoint is ``RUN/checkpoints/step-XXXXXXXX/``, itself a Hugging Face-format model
directory (``config.json`` + ``model.safetensors``, written by :func:`mobillama.checkpoint.save_checkpoint`,
loadable by ``MobiLlamaForCausalLM.from_pretrained``) plus everything needed to continue exactly:

    optimizer.safetensors + optimizer.json   full AdamW state keyed by parameter name (single process / DDP)
    dcp/                                     sharded model + optimizer state (FSDP2, torch.distributed.checkpoint;
                                             loadable at any world size)
    rng.safetensors                          every rank's torch (and CUDA) generator state
    trainer_state.json                       step, tokens seen, loader position (epoch, position, seed), the lr
                                             schedule position, last loss, recipe, code version, world size,
                                             and the sha256 of every other file in the directory
    metrics.jsonl                            the run's metrics up to this step

What the model part of the directory looks like is up to a :class:`ModelIO`: the default writes the
decoder checkpoint above (:class:`DecoderModelIO`); ``mobillama.vision.checkpoint.VisionModelIO`` writes a MobiLlama-V directory
(``decoder/`` + ``vision.safetensors`` + ``vision_config.json``), loadable by ``MobiLlamaV.from_pretrained``.
The training files sit beside it either way and are hashed the same way.

The directory is built under a temporary name and renamed into place (:func:`atomic_directory`), so a
crash or a full disk leaves the previous checkpoint as the newest complete one. ``RUN/checkpoints.json``
and ``RUN/checkpoints.csv`` list every checkpoint written (step, tokens, loss, data position, hashes,
whether retention kept it).
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mobillama.checkpoint import (
    WEIGHTS_NAME,
    atomic_directory,
    read_safetensors,
    save_checkpoint,
    sha256_file,
    write_json,
)
from mobillama.errors import MobiLlamaError
from mobillama.train.distributed import DistContext, unwrap

STATE_NAME = "trainer_state.json"
CKPT_DIR = "checkpoints"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The package version and, when the code runs from a git checkout, its commit and dirty flag."""
    from mobillama import __version__

    info: dict[str, Any] = {"mobillama": __version__, "torch": torch.__version__}
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# --- how the model's weights are laid out in a checkpoint ---------------------------------------------


class ModelIO(Protocol):
    """Writes and reads the model part of a step checkpoint from a full (unsharded) state dict."""

    #: files (relative to the checkpoint) that hold the weights; their hashes make ``model_sha256``
    weights_files: tuple[str, ...]

    def write(
        self,
        state: dict[str, torch.Tensor],
        config: Any,
        directory: Path,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        """Write ``state`` (keys as in ``model.state_dict()``) into ``directory`` (it may already exist)."""

    def read(self, directory: Path, config: Any) -> dict[str, torch.Tensor]:
        """The full state dict (tied weights included) that ``write`` stored in ``directory``."""


class DecoderModelIO:
    """The default: a decoder checkpoint (``config.json`` + ``model.safetensors``), what
    ``MobiLlamaForCausalLM.from_pretrained`` and :func:`mobillama.checkpoint.load_model` read."""

    weights_files: tuple[str, ...] = (WEIGHTS_NAME,)

    def write(
        self,
        state: dict[str, torch.Tensor],
        config: Any,
        directory: Path,
        tokenizer_dir: str | Path | None = None,
    ) -> None:
        save_checkpoint(state, config, directory, tokenizer_dir=tokenizer_dir, overwrite=True)

    def read(self, directory: Path, config: Any) -> dict[str, torch.Tensor]:
        weights = read_safetensors(directory / WEIGHTS_NAME)
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return weights


def weights_sha256(files: dict[str, str], model_io: ModelIO) -> str:
    """The hash of a checkpoint's weights: that of the one weights file, or for several the sha256 of
    their ``sha256sum``-style listing (``<digest>  <path>`` lines, in ``weights_files`` order)."""
    if len(model_io.weights_files) == 1:
        return files[model_io.weights_files[0]]
    listing = "".join(f"{files[name]}  {name}\n" for name in model_io.weights_files)
    return hashlib.sha256(listing.encode()).hexdigest()


# --- model / optimizer state in full (unsharded) form ----------------------------------------------------


def _sd_options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def full_model_state(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from shards under FSDP2; a collective there)."""
    if ctx.strategy == "fsdp2" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_sd_options(True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Name-keyed optimizer state -> (tensors for safetensors, JSON-able rest)."""
    tensors = {}
    meta: dict[str, Any] = {"param_groups": [], "state_keys": {}}
    for name, per_param in osd["state"].items():
        meta["state_keys"][name] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state_keys"][name][key] = value
    for group in osd["param_groups"]:
        meta["param_groups"].append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {name: dict(extra) for name, extra in meta["state_keys"].items()}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        state.setdefault(name, {})[field] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --- verification, listing ------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary and partial ones excluded)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def verify_checkpoint(path: str | Path) -> str | None:
    """None if every file matches the hash recorded in trainer_state.json, else the reason it does not."""
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        return f"no {STATE_NAME}"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = state["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable {STATE_NAME} ({e})"
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if sha256_file(f) != digest:
            return f"sha256 mismatch in {rel}"
    return None


def find_resume_checkpoint(run_dir: str | Path, say=print) -> Path | None:
    """The newest checkpoint whose files all match their hashes; each one skipped is reported."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        say(f"warning: checkpoint {path} is invalid ({problem}); falling back to the previous one")
    return None


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != STATE_NAME
    }


def _write_index(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    """checkpoints.json and checkpoints.csv, each replaced atomically."""
    tmp = run_dir / ".checkpoints.json.tmp"
    write_json(tmp, {"checkpoints": entries})
    tmp.replace(run_dir / "checkpoints.json")
    columns = ["step", "tokens", "loss", "epoch", "position", "path", "kept", "state_sha256", "model_sha256"]
    tmp = run_dir / ".checkpoints.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(entries)
    tmp.replace(run_dir / "checkpoints.csv")


def read_index(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "checkpoints.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["checkpoints"]


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary directories left by a crash during a save (they are never valid checkpoints)."""
    root = Path(run_dir) / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# --- save -----------------------------------------------------------------------------------------------


def save_training_checkpoint(
    run_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    config,
    trainer_state: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    model_io: ModelIO | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` atomically (collective: every rank must call it)."""
    model_io = model_io or DecoderModelIO()
    run_dir = Path(run_dir)
    step = int(trainer_state["step"])
    final = run_dir / CKPT_DIR / checkpoint_name(step)
    fsdp = ctx.strategy == "fsdp2" and ctx.distributed
    model_state = full_model_state(model, ctx)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if ctx.distributed:
        import torch.distributed as dist

        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng)
    if not fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # replicated state: every rank calls (it may be collective), rank 0 writes; other ranks get {}
        full_osd = get_optimizer_state_dict(unwrap(model), optimizer, options=_sd_options(True))
        if ctx.is_main:
            optim_tensors, optim_meta = flatten_optimizer(full_osd)
    error: BaseException | None = None
    tmp_holder: list[Path | None] = [None]
    try:
        if ctx.is_main:
            # overwrite: a step redone after resuming from an older checkpoint replaces its old copy
            with atomic_directory(final, overwrite=True) as tmp:
                model_io.write(model_state, config, tmp, tokenizer_dir)
                tmp_holder[0] = tmp
                if fsdp:
                    ctx.broadcast_object(str(tmp))
                    _save_dcp(model, optimizer, tmp / "dcp")
                    ctx.barrier()
                else:
                    save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
                    write_json(tmp / "optimizer.json", optim_meta)
                save_file(
                    {f"rank{r}.{k}": v for r, d in enumerate(rngs) for k, v in d.items()},
                    str(tmp / "rng.safetensors"),
                )
                metrics = run_dir / "metrics.jsonl"
                if metrics.is_file():
                    shutil.copyfile(metrics, tmp / "metrics.jsonl")
                state = dict(trainer_state, code_version=dict(code_version()), world_size=ctx.world_size)
                state["strategy"] = ctx.strategy
                state["files"] = _hash_tree(tmp)
                write_json(tmp / STATE_NAME, state)
        elif fsdp:
            tmp = Path(ctx.broadcast_object(None))
            _save_dcp(model, optimizer, tmp / "dcp")
            ctx.barrier()
    except OSError as e:
        error = e
    if error is not None:
        reason = "no space left on device" if getattr(error, "errno", None) == errno.ENOSPC else str(error)
        previous = list_checkpoints(run_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise MobiLlamaError(f"could not write checkpoint {final}: {reason}{kept}") from None
    ctx.barrier()
    if ctx.is_main:
        entries = [e for e in read_index(run_dir) if e["step"] != step]
        info = json.loads((final / STATE_NAME).read_text(encoding="utf-8"))
        entries.append(
            {
                "step": step,
                "tokens": trainer_state["tokens_seen"],
                "loss": trainer_state.get("loss"),
                "epoch": trainer_state["loader"]["epoch"],
                "position": trainer_state["loader"]["position"],
                "path": str(final.relative_to(run_dir)),
                "kept": True,
                "state_sha256": sha256_file(final / STATE_NAME),
                "model_sha256": weights_sha256(info["files"], model_io),
            }
        )
        _write_index(run_dir, sorted(entries, key=lambda e: e["step"]))
    return final


def _save_dcp(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def apply_retention(
    run_dir: str | Path, keep_last: int, keep_every_steps: int, final_step: int | None = None
) -> list[Path]:
    """Delete checkpoints outside the last ``keep_last`` and the multiples of ``keep_every_steps``."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    removed = []
    for p in ckpts:
        step = int(p.name[len(PREFIX) :])
        forever = (keep_every_steps and step % keep_every_steps == 0) or step == final_step
        if p not in keep and not forever:
            shutil.rmtree(p)
            removed.append(p)
    if removed:
        gone = {str(p.relative_to(run_dir)) for p in removed}
        entries = read_index(run_dir)
        for e in entries:
            if e["path"] in gone:
                e["kept"] = False
        _write_index(run_dir, entries)
    return removed


# --- load -----------------------------------------------------------------------------------------------


def load_training_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    model_io: ModelIO | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG state in place; return trainer_state.json.

    A ``dcp/`` checkpoint (from FSDP2) is resharded to the current world size by DCP; a full-state one is
    loaded by every rank and sharded or replicated by ``set_state_dict``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    target = model if ctx.strategy == "fsdp2" and ctx.distributed else unwrap(model)
    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(target, optimizer)
        holder = {"model": model_sd, "optim": optim_sd}
        dcp.load(holder, checkpoint_id=str(path / "dcp"))
        set_state_dict(target, optimizer, model_state_dict=holder["model"], optim_state_dict=holder["optim"])
    else:
        weights = (model_io or DecoderModelIO()).read(path, unwrap(model).config)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(target, weights, options=options)
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        osd = unflatten_optimizer(read_safetensors(path / "optimizer.safetensors"), meta)
        set_optimizer_state_dict(target, optimizer, osd, options=options)
    rng = read_safetensors(path / "rng.safetensors")
    mine = f"rank{ctx.rank}." if f"rank{ctx.rank}.cpu" in rng else "rank0."
    torch.set_rng_state(rng[mine + "cpu"])
    if torch.cuda.is_available() and mine + "cuda" in rng:
        torch.cuda.set_rng_state(rng[mine + "cuda"])
    return state


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """``--init-from``: copy a checkpoint's weights into a freshly built model of the same shape."""
    from mobillama.checkpoint import check_state_dict, load_checkpoint

    config, weights = load_checkpoint(path)
    check_state_dict(weights, model.config, f"--init-from {path}")
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True)
