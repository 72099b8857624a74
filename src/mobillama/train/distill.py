"""Knowledge distillation: heal a merged model (``mobillama share``) by training it towards its source.

The teacher runs in eval mode without gradients next to the student, on the same micro-batch, so its
logits exist for one micro-batch at a time (memory bounded by the batch, nothing cached). The loss is a
*sum* over target tokens like every loss of :class:`~mobillama.train.loop.Trainer` (it normalises):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy

The T^2 factor keeps the KL term's gradient on the scale of the cross-entropy's whatever T is (Hinton et
al., 2015); at T = 1 it is 1. Positions whose label is -100 (no target) are left out of both terms.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobillama.config import ModelConfig
from mobillama.errors import MobiLlamaError
from mobillama.train.loop import IGNORE_INDEX, CrossEntropyFn, summed_cross_entropy


def summed_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * sum_t KL(p_teacher,t || p_student,t)`` over target positions, softmaxes at temperature T, fp32."""
    mask = labels != IGNORE_INDEX
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


def distill_loss_sum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    teacher: nn.Module,
    temperature: float,
    alpha: float,
    cross_entropy: CrossEntropyFn = summed_cross_entropy,
) -> torch.Tensor:
    """The summed healing loss of one micro-batch (see the module docstring)."""
    mask = batch.get("attention_mask")
    logits = model(batch["input_ids"], attention_mask=mask)
    loss = cross_entropy(logits, batch["labels"])
    if alpha == 0:
        return loss
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"], attention_mask=mask)
    kl = summed_kl(logits, teacher_logits, batch["labels"], temperature)
    return alpha * kl + (1 - alpha) * loss


def load_teacher(
    path: str | Path, student: ModelConfig, tokenizer_dir: str | Path | None, device: torch.device
) -> nn.Module:
    """The teacher model, frozen, in eval mode on ``device``; its vocabulary must be the student's (size
    and, where both carry a tokenizer, the same tokenizer), else a one-line error."""
    from mobillama.checkpoint import load_model
    from mobillama.config import ModelConfig as Config

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MobiLlamaError(f"--distill-from {path}: not a checkpoint directory")
    config = Config.load(path / "config.json")
    if config.vocab_size != student.vocab_size:
        raise MobiLlamaError(
            f"--distill-from {path}: the teacher's vocabulary has {config.vocab_size} tokens, the student's "
            f"{student.vocab_size}; distillation needs the same vocabulary"
        )

    def has_tok(d: str | Path | None) -> bool:
        return d is not None and any((Path(d) / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))

    if has_tok(path) and has_tok(tokenizer_dir):
        from mobillama.tokenizer import load_tokenizer

        if load_tokenizer(path).sha256 != load_tokenizer(tokenizer_dir).sha256:
            raise MobiLlamaError(
                f"--distill-from {path}: the teacher's tokenizer differs from the run's ({tokenizer_dir}); "
                "distillation needs the same vocabulary"
            )
    teacher = load_model(path, dtype=torch.float32, device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def freeze_all_but_ffns(model: nn.Module) -> int:
    """``model.train_only: ffn``: only the (shared) FFNs train; returns the trainable parameter count."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.ffns."))
        trainable += param.numel() if param.requires_grad else 0
    return trainable
