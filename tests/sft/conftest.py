"""A tiny byte-level BPE tokenizer with a MobiLlama-Chat style template, a base checkpoint and recipe files
(tokenizer and checkpoint from the shared ``fixtures`` builders)."""

from __future__ import annotations

import pytest

from fixtures import byte_bpe_tokenizer, save_micro_checkpoint

TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}"
    "{% else %}A chat between a curious human and an artificial intelligence assistant.{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}{{ '\\n### Human: ' + m['content'] }}"
    "{% else %}{{ '\\n### Assistant: ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n### Assistant:' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    corpus = [
        "A chat between a curious human and an artificial intelligence assistant.",
        "### Human: What does json.dumps do?",
        "### Assistant: Serialize obj to a JSON formatted str.",
    ]
    return byte_bpe_tokenizer(corpus * 20, 400, chat_template=TEMPLATE, pad_token="<unk>")


# --- fixtures for the run tests: the project's own tokenizer (real MobiLlama-Chat template) + a base checkpoint


@pytest.fixture(scope="session")
def project_tokenizer(tmp_path_factory):
    """``mobillama.tokenizer.train_tokenizer`` on a few KB of instruction-like text (template stored)."""
    from mobillama.sft.instructions import build_pairs
    from mobillama.tokenizer import train_tokenizer

    texts = [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"] for r in build_pairs()]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(texts, 1024, out, progress=False), out


@pytest.fixture(scope="session")
def base_checkpoint(project_tokenizer, tmp_path_factory):
    """A micro MobiLlama (shared FFN) checkpoint carrying the project tokenizer: the SFT base."""
    tok, tok_dir = project_tokenizer
    out = tmp_path_factory.mktemp("base") / "ckpt"
    return save_micro_checkpoint(out, tok_dir, vocab_size=tok.vocab_size, max_position_embeddings=256)


@pytest.fixture(scope="session")
def instruction_set(tmp_path_factory):
    from mobillama.sft.instructions import write_instruction_set

    out = tmp_path_factory.mktemp("data") / "stdlib-sft"
    write_instruction_set(out)
    return out


def write_sft_recipe(recipe_path, base, train_file, *, out_dir, val=None, **sections):
    """A tiny SFT recipe file; ``sections`` update the defaults section by section."""
    import yaml

    data = {
        "name": "sft-test",
        "out_dir": str(out_dir),
        "model": {"base": str(base)},
        "data": {"train": str(train_file), "val": str(val) if val else None, "max_length": 160, "seed": 3},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_ratio": 0.1},
        "batch": {"micro_batch_size": 4, "grad_accum": 2},
        "train": {"max_steps": 6, "device": "cpu", "seed": 0},
        "eval": {"every_steps": 2, "max_batches": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "log": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    recipe_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return recipe_path


@pytest.fixture(scope="session")
def sft_recipe_writer():
    """``write_sft_recipe`` for test modules (importlib mode cannot import conftest by name)."""
    return write_sft_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids barrier stalls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
