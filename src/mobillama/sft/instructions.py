"""A small real instruction set that needs no download: questions about the Python standard library.

Every Python installation carries documented functions. For each public function or class of a fixed
list of modules with a docstring, we ask what it does and answer with the docstring's summary (its
first paragraph), prefixed by the call signature. Phrasings rotate deterministically; a stable hash of
the qualified name puts each function wholly in the train or the held-out split, so held-out prompts
ask about functions the model never saw answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

from mobillama.checkpoint import atomic_directory

MODULES = (
    "json",
    "os",
    "os.path",
    "re",
    "collections",
    "itertools",
    "functools",
    "math",
    "string",
    "textwrap",
    "pathlib",
    "datetime",
    "random",
    "statistics",
    "shutil",
    "heapq",
    "bisect",
    "copy",
    "glob",
    "fnmatch",
    "csv",
    "base64",
    "hashlib",
    "zlib",
    "gzip",
    "tempfile",
    "time",
    "calendar",
    "difflib",
    "operator",
    "urllib.parse",
    "html",
    "struct",
    "uuid",
    "secrets",
    "fractions",
    "decimal",
    "enum",
    "typing",
    "dataclasses",
    "contextlib",
    "inspect",
    "logging",
    "argparse",
    "shlex",
    "subprocess",
    "threading",
    "queue",
    "socket",
    "sqlite3",
    "pickle",
    "zipfile",
    "tarfile",
    "io",
    "sys",
    "platform",
    "locale",
)
QUESTIONS = (
    "What does `{name}` do?",
    "Explain what `{name}` is for.",
    "In Python, what is `{name}`?",
    "Describe `{name}` in one or two sentences.",
)


def _summary(doc: str) -> str:
    first = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip()


def _signature(obj, name: str) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def build_pairs() -> list[dict]:
    """All (question, answer) records, in a deterministic order, each tagged with its split."""
    records = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            home = (getattr(obj, "__module__", None) or module_name).split(".")[0].lstrip("_")
            if home not in (module_name.split(".")[0], "posixpath", "builtins"):
                continue  # re-exported from elsewhere: ask about it where it is defined
            doc = inspect.getdoc(obj)
            if not doc or len(_summary(doc)) < 20:
                continue
            name = f"{module_name}.{attr}"
            digest = int(hashlib.sha256(name.encode()).hexdigest(), 16)
            question = QUESTIONS[digest % len(QUESTIONS)].format(name=name)
            answer = f"`{_signature(obj, name)}`: {_summary(doc)}"
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "name": name,
                    "split": "heldout" if digest % 10 == 0 else "train",
                }
            )
    return records


def write_instruction_set(out_dir: str | Path) -> dict[str, int]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (OpenAI messages format) atomically; returns counts."""
    counts = {"train": 0, "heldout": 0}
    with atomic_directory(out_dir, overwrite=True) as tmp, contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(tmp / f"{s}.jsonl", "w", encoding="utf-8")) for s in counts}
        for record in build_pairs():
            line = json.dumps({"messages": record["messages"], "name": record["name"]})
            files[record["split"]].write(line + "\n")
            counts[record["split"]] += 1
    return counts
