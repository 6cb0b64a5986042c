"""lm-evaluation-harness tasks (`type: lm_eval`) in the evaluate stage, run by lm-eval itself.

A task names either a task or group of lm-eval's registry (`task: hellaswag`; its data comes
the way lm-eval gets it: the Hugging Face hub, or its cache with HF_DATASETS_OFFLINE=1), or a local
task YAML (`yaml: tasks/colors.yaml`) in lm-eval's format, whose data are files named in
`dataset_kwargs.data_files` (local paths, read from the current directory as lm-eval reads them, or
s3:// URIs). The stage copies such a YAML, its `include`s merged in, and its data files into its own
output, so that the evaluation on any node reads them and the commit lists what was evaluated;
`!function` tags (Python helpers beside the YAML) are not supported.

Each task is one `simple_evaluate` call on the exported model (lm-eval's `hf` model with its
defaults: the export's dtype), with the task's `limit` and `num_fewshot` and the stage's batch
size and device, as `lm_eval --model hf --model_args pretrained=DIR --tasks NAME --include_path
DIR --batch_size N --device D` would run it. Its metrics land under the task's `name` in the
results, named as lm-eval names them without the default filter: `acc`, `acc_stderr`, `acc_norm`,
`acc_norm_stderr` (a metric of another filter keeps it: `exact_match,strict-match`), plus
`num_examples`; the gate names them `<model>/<name>/<metric>`.

lm-eval is an optional extra: this module imports it only inside the functions that run it, and
`task_problems` (validate) reports it missing with the install command. lm-eval indexes its
registry of ~14,000 YAML files on every start (about 8 s here), so the registry's names are cached
per lm-eval version for validate (`registry_names`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from importlib.util import find_spec
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from jobs.fields import output
from jobs.storage import open_storage

INSTALL = "pip install 'ray-llm-orchestrator[lm-eval]'"
MAX_SUGGESTIONS = 3


class LmEvalTaskSpec(BaseModel):
    """One lm-evaluation-harness task, run by lm-eval on the exported model: a task of lm-eval's
    registry, or a local task YAML whose data are local or s3:// files (needs the `lm-eval` extra)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = output(pattern=r"^[A-Za-z0-9_-]+$")
    """Label of the task in the results and in gate metric names (`<model>/<name>/acc`)."""
    type: Literal["lm_eval"] = output()
    """Selects lm-evaluation-harness: `type: lm_eval`."""
    task: str | None = output(None, min_length=1)
    """A task or group of lm-eval's registry, e.g. hellaswag (its data come from the Hugging Face
    hub, or its cache with HF_DATASETS_OFFLINE=1); give this or `yaml`."""
    yaml: str | None = output(None, local="file")
    """Local task YAML in lm-eval's format, defining one `task:`; its `include`s are merged in and
    its `dataset_kwargs.data_files` (local paths, relative to the current directory, or s3:// URIs)
    are copied into the stage's output. The hash covers the YAML, its includes and its local data
    files, not an s3:// file's content (name a changed one anew). No `!function` tags. Give this
    or `task`."""
    limit: int | None = output(None, ge=1)
    """Evaluate only the first N documents (lm-eval's `--limit`); null for all."""
    num_fewshot: int | None = output(None, ge=0)
    """Few-shot examples per prompt (lm-eval's `--num_fewshot`); null for the task's default."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.task is None) == (self.yaml is None):
            raise ValueError(f"task {self.name!r}: give exactly one of `task` (a name in lm-eval's registry) "
                             "and `yaml` (a local task YAML)")
        return self

    def local_files_inside(self) -> list[tuple[str, str]]:
        """(field, path) of the local files the task YAML names: its includes and local data files,
        which the plan fingerprints and `submit` ships beside it; [] when it does not read (validate
        says why)."""
        if self.yaml is None:
            return []
        try:
            config, includes = read_task_yaml(self.yaml)
            data = [p for p in data_files(config) if not p.startswith("s3://")]
        except (OSError, ValueError):
            return []
        return [("yaml", p) for p in includes] + [("yaml.dataset_kwargs.data_files", p) for p in data]


# --- validate ------------------------------------------------------------------------------


def task_problems(where: str, spec: LmEvalTaskSpec) -> list[str]:
    """What is wrong with the task before anything runs: lm-eval missing, a YAML that does not read
    or names missing data files, a name lm-eval's registry does not know. `where`: its field path."""
    if find_spec("lm_eval") is None:
        return [f"{where}.type: lm_eval tasks run lm-evaluation-harness, which is not installed; "
                f"install it: {INSTALL}"]
    if spec.yaml is not None:
        try:
            files = data_files(read_task_yaml(spec.yaml)[0])
        except (OSError, ValueError) as e:
            return [f"{where}.yaml: {e}"]
        missing = [p for p in files if not p.startswith("s3://") and not os.path.isfile(p)]
        return [f"{where}.yaml: {spec.yaml} names data file {p!r} (dataset_kwargs.data_files), which does not "
                f"exist; relative paths are read from the current directory ({os.getcwd()})" for p in missing]
    registry = registry_names()
    if spec.task in registry["tasks"]:
        return []
    if spec.task in registry["tags"]:
        return [f"{where}.task: {spec.task!r} is a tag of lm-eval's registry, a set of tasks without a metric of "
                "its own; list each of its tasks as a task of its own (`lm_eval ls tags` shows them)"]
    close = difflib.get_close_matches(spec.task, registry["tasks"], n=MAX_SUGGESTIONS)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "`lm_eval ls tasks` lists them"
    return [f"{where}.task: {spec.task!r} is not a task or group of lm-eval {_version()}'s registry; {hint}"]


def registry_names() -> dict[str, list[str]]:
    """The installed lm-eval's registry: {"tasks": task and group names, "tags": tag names}.
    Building lm-eval's index reads all its task YAMLs (about 8 s), so the names are kept in the
    user's cache directory, one file per lm-eval version and task directory (a changed
    installation gets a new file)."""
    import lm_eval

    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    key = f"{_version()}-{os.stat(tasks_dir).st_mtime_ns}"
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrator")
    path = os.path.join(cache_dir, f"lm-eval-registry-{key}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass  # not cached yet: build it
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    tags = set(manager.all_tags)
    names = {"tasks": [n for n in manager.all_tasks if n not in tags], "tags": sorted(tags)}
    try:  # atomic, and no temp file is left behind when the write fails
        open_storage(cache_dir).write_bytes(os.path.basename(path), json.dumps(names).encode())
    except OSError:
        pass  # a read-only cache only costs the next validate the same 8 s
    return names


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# --- local task YAMLs ----------------------------------------------------------------------


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML as lm-eval's task files are written, refusing `!function` (a Python helper beside the
    file, which the stage does not copy)."""


def _no_function(loader, node):
    raise ValueError(f"`!function {node.value}` (line {node.start_mark.line + 1}) is not supported in a local "
                     "task YAML: the stage copies the YAML and its data files, not Python helpers")


_TaskYamlLoader.add_constructor("!function", _no_function)


def read_task_yaml(path: str) -> tuple[dict, list[str]]:
    """The task config of a local YAML with its `include`s merged in as lm-eval merges them (the
    including file's keys win; a relative include is beside the file), and the included files.
    Raises ValueError naming what is wrong (OSError when the file cannot be read)."""
    config, includes = _read_yaml(path, [])
    task = config.get("task")
    if "group" in config or "class" in config or not isinstance(task, str) or not task:
        raise ValueError(f"{path} must define one task (`task: NAME` with `dataset_path`, `output_type`, ...), "
                         "not a group, a tag or a Python class")
    return config, includes


def _read_yaml(path: str, seen: list[str]) -> tuple[dict, list[str]]:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file")
    if os.path.abspath(path) in seen:
        raise ValueError(f"{path} includes itself (through {' -> '.join(seen)})")
    with open(path, "rb") as f:
        try:
            config = yaml.load(f, Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must be a mapping of lm-eval task fields")
    included = config.pop("include", None)
    if included is None:
        return config, []
    merged, files = {}, []
    for name in included if isinstance(included, list) else [included]:
        if not isinstance(name, str):
            raise ValueError(f"{path}: `include` takes a file name or a list of them, not {name!r}")
        inc = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
        inc_config, inc_files = _read_yaml(inc, seen + [os.path.abspath(path)])
        inc_config.pop("task_list", None)  # as lm-eval: it lists the included file's own tasks
        merged.update(inc_config)
        files += [inc, *inc_files]
    return merged | config, files


def data_files(config: dict) -> list[str]:
    """The files of `dataset_kwargs.data_files` (a path, a list, or split -> path(s)), in order."""
    found: list[str] = []
    map_data_files(config, lambda p: found.append(p) or p)
    return found


def map_data_files(config: dict, fn) -> dict:
    """`config` with every file of `dataset_kwargs.data_files` replaced by fn(file)."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return config

    def each(value):
        if isinstance(value, str):
            return fn(value)
        if isinstance(value, list):
            return [each(v) for v in value]
        if isinstance(value, dict):
            return {split: each(v) for split, v in value.items()}
        raise ValueError(f"dataset_kwargs.data_files: give a path, a list of paths or split -> path(s), not {value!r}")

    return {**config, "dataset_kwargs": {**kwargs, "data_files": each(kwargs["data_files"])}}


# --- run -----------------------------------------------------------------------------------


def run_harness(model_dir: str, tasks: list[tuple[LmEvalTaskSpec, str | dict]], batch_size: int,
                device: str) -> dict[str, dict[str, float | int]]:
    """Each task on the Hugging Face model in `model_dir`: (spec, a registry name or a task config
    whose data files are local) -> {spec.name: metrics}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # The model is loaded once for every task; the task manager gets the model as metadata, as in
    # lm-eval's CLI (some tasks read its tokenizer), and indexes the registry only when a task is in it.
    lm = HFLM(pretrained=model_dir, device=device, batch_size=batch_size)
    manager = TaskManager(include_defaults=any(isinstance(t, str) for _, t in tasks),
                          metadata={"pretrained": model_dir})
    out = {}
    for spec, task in tasks:
        results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=spec.limit,
                                  num_fewshot=spec.num_fewshot, batch_size=batch_size, device=device,
                                  log_samples=False)
        out[spec.name] = harness_metrics(results, task if isinstance(task, str) else task["task"])
    return out


def harness_metrics(results: dict, task_name: str) -> dict[str, float | int]:
    """One task's (or group's) numbers from `simple_evaluate`'s results: lm-eval's `metric,filter`
    keys without the default filter `none`, finite numbers only, and `num_examples` (documents
    scored, over every subtask). Raises ValueError when lm-eval reports no metric for it (a tag, or
    a group that does not aggregate its subtasks)."""
    row = results["results"].get(task_name, {})
    metrics: dict[str, float | int] = {}
    for key, value in row.items():
        metric, comma, filter_name = key.partition(",")
        if comma and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[metric if filter_name == "none" else key] = value
    if not metrics:
        raise ValueError(f"lm-eval reports no metric for {task_name!r} itself, only for {sorted(results['results'])}; "
                         "name one of those (a tag, or a group without an aggregate, has no metric of its own)")
    metrics["num_examples"] = sum(n["effective"] for n in results["n-samples"].values())
    return metrics
