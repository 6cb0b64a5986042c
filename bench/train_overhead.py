#!/usr/bin/env python3
"""Benchmark: the training loop bare under `torchrun` vs. through the orchestrator (Ray Train).

The same job both ways: a small Llama (hidden 256, 4 layers by default), DeepSpeed ZeRO-2 on CPU
(gloo, fp32), 2 workers, seq_len 128, on the same preprocessed data.

  data          the tokenizer + preprocess stages of a pipeline, run once with `run_pipeline` on
                an embedded Ray into a local storage dir (under bench/.data/, reused if committed);
                Ray is shut down after it.
  bare          `torchrun --nproc_per_node 2 -m jobs.train JOB.json`, a subprocess, given that
                preprocess stage's output URI. Rank 0 prints a JSON line per log window.
  orchestrator  `run_pipeline` on the same pipeline file plus a pretrain stage with the same fields
                (tokenizer and preprocess are cache hits), Ray started for it (timed apart:
                `orchestrator.ray_runtime.connect`, as `orchestrator run` does), shut down after.

In-loop step time: every log window reports `tokens_per_s`; step time = global batch x seq_len /
tokens_per_s. The first window (warm-up, lazy data fetch) is left out; the median of the other
windows counts. Runs alternate bare / orchestrator, `--repeat` each; medians across runs.

Wall time is split where the driver can see it: for each path, start -> training loop start (the
first report's arrival minus its window's duration) -> last report -> end. For the orchestrator
also: Ray start, the stage's start and end in the run record, an empty Ray Train worker group
(`TorchTrainer` with a no-op loop, same scaling) as a direct measure of what starting and stopping
the worker group costs, and the data fetch (the packed shards and the tokenizer copied from the
storage into a fresh cache, timed in this process). The node-local data cache is emptied before
every run so that each pays the fetch.

    .venv/bin/python bench/train_overhead.py [--steps 60] [--log-every 10] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import importlib
import json
import logging
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_ROOT = REPO / "bench" / ".data" / "train_overhead"
CACHE_ROOT = os.path.join(tempfile.gettempdir(), "orchestrator-cache")  # TrainJob.cache_dir's default
from proc_cpu import CLOCK_TICKS as _CLK, process_table  # noqa: E402
_PROGRESS = re.compile(r"step\s+(\d+)\s+loss\s+([\d.]+).*?([\d,]+) tokens/s")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_name(pid: int) -> str:
    """A short name for a process of ours: 'ray::TrainController', 'raylet', 'jobs.train', 'torchrun'..."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if pid == os.getpid():
        return "driver (this script)"
    if not args:
        return "?"
    if args[0].startswith("ray::"):  # setproctitle: 'ray::RayTrainWorker.run  ...'
        return args[0].split()[0].split(".")[0]
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    for a in args[:3]:
        if a.endswith(".py") or a.endswith("torchrun"):
            return os.path.basename(a)
    return os.path.basename(args[0])


class LoadMeter:
    """CPU of this process tree, per process, vs. everything else on this shared machine.

    A thread samples /proc every `period` s: each descendant's CPU time and name, and /proc/stat's
    busy time. A process that exits in between (a Ray worker, a torchrun rank) loses at most its
    last period; "others" is the machine's busy time minus ours. `cores(a, b)` gives the average
    cores used between two perf_counter times, per process name."""

    def __init__(self, period: float = 0.25):
        self.period = period
        self.samples: list[tuple[float, float, dict[int, float]]] = []  # (t, machine busy, {pid: CPU})
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        cpu, stack = {}, [os.getpid()]
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, []))
            cpu[pid] = table[pid][1]
            name = proc_name(pid)
            if name != "?" and not (name == "ray::IDLE" and pid in self.names):
                self.names[pid] = name
        self.samples.append((time.perf_counter(), self._busy(), cpu))

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        return sum(cpu[i] for i in (0, 1, 2, 5, 6)) / _CLK  # user nice system irq softirq

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()  # the baseline: what ran before does not count
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        self.result = self.cores()

    def cores(self, t_a: float | None = None, t_b: float | None = None) -> dict:
        """Average cores used in [t_a, t_b] (the samples just inside it): ours per name, others."""
        inside = [s for s in self.samples if (t_a is None or s[0] >= t_a) and (t_b is None or s[0] <= t_b)]
        (ta, busy_a, cpu_a), (tb, busy_b, _) = inside[0], inside[-1]
        last: dict[int, float] = {}
        for _, _, cpu in inside:
            last.update(cpu)  # the last CPU time seen of every process, live or gone since
        by_name: dict[str, float] = {}
        for pid, c in last.items():
            name = self.names.get(pid, "?")
            by_name[name] = by_name.get(name, 0.0) + (c - cpu_a.get(pid, 0.0)) / (tb - ta)
        ours = sum(by_name.values())
        return {"ours_cores": ours, "others_cores": max((busy_b - busy_a) / (tb - ta) - ours, 0.0),
                "by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


# --------------------------------------------------------------------------------------------
# The pipeline: data stages, then the pretrain stage with the training fields
# --------------------------------------------------------------------------------------------

def train_fields(args) -> dict:
    return {"steps": args.steps, "log_every": args.log_every, "checkpoint_every": args.steps,
            "micro_batch": args.micro_batch, "zero_stage": 2, "lr": 1e-3, "warmup_steps": 10, "seed": 0,
            "model": {"preset": None, "hidden_size": args.hidden, "num_layers": args.layers,
                      "num_heads": args.heads, "num_kv_heads": args.heads, "intermediate_size": 4 * args.hidden,
                      "max_position_embeddings": args.seq_len}}


def pipeline_text(storage: str, args, with_pretrain: bool) -> str:
    source = {"paths": [str(REPO / "examples" / "data" / "*.jsonl")]}
    stages = {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": args.vocab, "sample_mb": 1},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": args.seq_len,
                   "shard_mb": 1},
    }
    if with_pretrain:
        stages["pretrain"] = {"kind": "pretrain", "data": "corpus", "num_workers": 2, "cpus_per_worker": 1,
                              "max_failures": 0, **train_fields(args)}
    return json.dumps({"name": "bench-train-overhead", "storage": storage, "stages": stages})


def make_console():
    from orchestrator.console import Console

    class TimingConsole(Console):
        """Quiet; timestamps the stage edges and every progress line (one per log window)."""

        def __init__(self):
            super().__init__(open(os.devnull, "w"))
            self.events: list[tuple[float, str, object]] = []

        def line(self, text: str) -> None:
            if m := _PROGRESS.search(text):
                self.events.append((time.perf_counter(), "report",
                                    {"step": int(m.group(1)), "loss": float(m.group(2)),
                                     "tokens_per_s": float(m.group(3).replace(",", ""))}))

        def stage_started(self, name, kind, reason):
            self.events.append((time.perf_counter(), "started", name))

        def stage_finished(self, name, stage):
            self.events.append((time.perf_counter(), "finished", name))

    return TimingConsole()


def prepare_data(args) -> tuple[str, int]:
    """The preprocess stage's output URI and the vocabulary size (run once; later calls are cache hits)."""
    import ray

    from jobs.storage import open_storage
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    storage = f"file://{DATA_ROOT}/store"
    spec = parse_spec(pipeline_text(storage, args, with_pretrain=False))
    t0 = time.perf_counter()
    record = run_pipeline(spec, open_storage(storage), console=make_console())
    wall = time.perf_counter() - t0
    ray.shutdown()
    corpus = record.stages["corpus"]
    how = "cached" if corpus.cached else f"ran in {wall:.1f} s"
    vocab = record.stages["tok"].metrics["vocab_size"]
    print(f"data: {corpus.metrics.get('num_sequences')} sequences of {args.seq_len} tokens, vocab {vocab} "
          f"(asked {args.vocab}; the corpus is small) ({how}) -> {corpus.output_uri}", flush=True)
    return corpus.output_uri, vocab


def clear_cache(data_uri: str) -> None:
    shutil.rmtree(os.path.join(CACHE_ROOT, data_uri.rstrip("/").rsplit("/", 1)[-1]), ignore_errors=True)


def time_data_fetch(data_uri: str) -> float:
    """What a rank fetches before and during its first steps: the tokenizer and every packed shard."""
    from jobs.data import PackedTokens
    from jobs.storage import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        open_storage(data_uri).download_prefix("tokenizer", os.path.join(tmp, "tokenizer"))
        data = PackedTokens(data_uri, "train", tmp)
        for i in range(len(data.files)):
            data._map(i)  # noqa: SLF001 (bench): the lazy download the loop does on first use
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------

def windows_from(reports: list[tuple[float, dict]], tokens_per_step: int, log_every: int) -> dict:
    """Per-window step times, the loop's start and its last report, from (arrival, metrics) pairs."""
    steps = [m["step"] for _, m in reports]
    step_s, prev = [], 0
    for _, m in reports:
        step_s.append((m["step"] - prev) * tokens_per_step / m["tokens_per_s"] / (m["step"] - prev))
        prev = m["step"]
    first_arrival, first = reports[0]
    loop_start = first_arrival - first["step"] * step_s[0]
    return {"steps": steps, "step_s": step_s, "steady_step_s": median(step_s[1:]), "loop_start": loop_start,
            "last_report": reports[-1][0], "final_loss": reports[-1][1]["loss"]}


def run_bare(data_uri: str, work: str, k: int, args, tokens_per_step: int) -> dict:
    from jobs.train_spec import TrainSpec

    spec = TrainSpec.model_validate(train_fields(args)).model_dump(mode="json")
    job_path = os.path.join(work, f"bare-{k}.json")
    with open(job_path, "w") as f:
        json.dump({"spec": spec, "data_uri": data_uri, "out_uri": f"file://{work}/bare-out-{k}",
                   "config_hash": "torchrun"}, f)
    cmd = [str(REPO / ".venv" / "bin" / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "jobs.train", job_path]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    clear_cache(data_uri)
    reports: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    with LoadMeter() as meter, open(os.path.join(work, f"bare-{k}.stderr"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:  # rank 0's JSON lines, timestamped as they arrive
            if line.startswith("{"):
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if "tokens_per_s" in m and "step" in m and "files" not in m:
                    reports.append((time.perf_counter(), m))
        rc = proc.wait()
    end = time.perf_counter()
    load = meter.result
    if rc != 0:
        raise RuntimeError(f"torchrun exited {rc}; see {err.name}")
    w = windows_from(reports, tokens_per_step, args.log_every)
    return {**w, "wall_s": end - t0, "pre_loop_s": w["loop_start"] - t0, "loop_s": w["last_report"] - w["loop_start"],
            "post_loop_s": end - w["last_report"], **load,
            "pre_loop_cpu": meter.cores(t0, w["loop_start"]), "steady_cpu": meter.cores(reports[0][0], reports[-1][0])}


def run_orchestrator(data_uri: str, k: int, args, tokens_per_step: int, measure_empty: bool) -> dict:
    import ray

    from jobs.storage import open_storage
    from orchestrator import ray_runtime
    from orchestrator.runner import run_pipeline
    from orchestrator.spec import parse_spec

    storage = f"file://{DATA_ROOT}/store"
    spec = parse_spec(pipeline_text(storage, args, with_pretrain=True))
    for old in (DATA_ROOT / "store" / "stages").glob("pretrain-*"):  # a committed one would be a cache hit
        shutil.rmtree(old)
    console = make_console()
    clear_cache(data_uri)
    with LoadMeter() as meter:
        t0 = time.perf_counter()
        ray_runtime.connect()  # what run_pipeline does first; timed apart
        t_ray = time.perf_counter()
        record = run_pipeline(spec, open_storage(storage), run_id=f"bench-{os.getpid()}-{k}", console=console)
        end = time.perf_counter()
    load = meter.result
    stage = record.stages["pretrain"]
    assert record.status == "succeeded" and not stage.cached and record.stages["corpus"].cached, record
    assert record.stages["corpus"].output_uri == data_uri
    empty = {}
    if measure_empty:  # an empty worker group, same scaling and backend: what starting + stopping it costs
        with LoadMeter() as empty_meter:
            t_empty = time.perf_counter()
            empty_trainer(args).fit()
            empty_s = time.perf_counter() - t_empty
        empty = {"empty_worker_group_s": empty_s, "empty_worker_group_cpu": empty_meter.result}
    t_down = time.perf_counter()
    ray.shutdown()
    shutdown_s = time.perf_counter() - t_down
    at = {kind: t for t, kind, name in console.events if kind in ("started", "finished") and name == "pretrain"}
    reports = [(t, m) for t, kind, m in console.events if kind == "report"]
    w = windows_from(reports, tokens_per_step, args.log_every)
    return {**w, "wall_s": end - t0, "ray_start_s": t_ray - t0, "before_stage_s": at["started"] - t_ray,
            "stage_s": at["finished"] - at["started"], "pre_loop_s": w["loop_start"] - at["started"],
            "loop_s": w["last_report"] - w["loop_start"], "post_loop_s": at["finished"] - w["last_report"],
            "after_stage_s": end - at["finished"], **empty, "ray_shutdown_s": shutdown_s,
            "record_stage_s": stage.finished_at - stage.started_at, "record_tokens_per_s": stage.metrics["tokens_per_s"],
            **load, "pre_loop_cpu": meter.cores(at["started"], w["loop_start"]),
            "steady_cpu": meter.cores(reports[0][0], reports[-1][0])}


def _noop_loop(config: dict) -> None:
    pass


def empty_trainer(args):
    import tempfile as tf

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(_noop_loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                                  resources_per_worker={"CPU": 1}),
                        torch_config=TorchConfig(backend="gloo"),
                        run_config=RunConfig(name="bench-empty", storage_path=os.path.join(tf.gettempdir(), "orchestrator-ray-train"),
                                             failure_config=FailureConfig(max_failures=0),
                                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}))


def cpu_line(rows: list[dict], key: str, top: int = 7) -> str:
    names = {n for r in rows for n in r[key]["by_name"]}
    cores = {n: median([r[key]["by_name"].get(n, 0.0) for r in rows]) for n in names}
    ranked = sorted(cores.items(), key=lambda kv: -kv[1])[:top]
    others = median([r[key]["others_cores"] for r in rows])
    return ", ".join(f"{n} {c:.2f}" for n, c in ranked if c >= 0.005) + f"; other processes {others:.2f}"


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    importlib.import_module("ray.train.torch")  # the driver's own imports: not part of either wall time

    from jobs.model import ModelSpec, num_parameters, llama_config

    data_uri, vocab = prepare_data(args)
    tokens_per_step = args.micro_batch * 2 * args.seq_len  # grad_accum 1, 2 workers
    model = ModelSpec.model_validate(train_fields(args)["model"])
    print(f"model: {num_parameters(llama_config(model, vocab, 0, 1)) / 1e6:.1f}M parameters (hidden {args.hidden}, "
          f"{args.layers} layers), ZeRO-2 fp32, 2 workers x 1 CPU, micro batch {args.micro_batch}, seq_len "
          f"{args.seq_len}, {args.steps} steps, a report every {args.log_every}", flush=True)
    fetch_s = median([time_data_fetch(data_uri) for _ in range(3)])
    bare, orch = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-overhead-") as work:
        for k in range(args.repeat):
            bare.append(run_bare(data_uri, work, k, args, tokens_per_step))
            b = bare[-1]
            print(f"  bare {k + 1}: wall {b['wall_s']:.1f} s (pre-loop {b['pre_loop_s']:.1f}, loop {b['loop_s']:.1f}, "
                  f"post-loop {b['post_loop_s']:.1f}); steady step {b['steady_step_s'] * 1e3:.0f} ms "
                  f"(windows: {' '.join(f'{s * 1e3:.0f}' for s in b['step_s'])}); others used "
                  f"{b['others_cores']:.2f} cores", flush=True)
            orch.append(run_orchestrator(data_uri, k, args, tokens_per_step, measure_empty=k == args.repeat - 1))
            o = orch[-1]
            print(f"  orch {k + 1}: wall {o['wall_s']:.1f} s (Ray start {o['ray_start_s']:.1f}, stage {o['stage_s']:.1f}: "
                  f"pre-loop {o['pre_loop_s']:.1f}, loop {o['loop_s']:.1f}, post-loop {o['post_loop_s']:.1f}); "
                  f"steady step {o['steady_step_s'] * 1e3:.0f} ms (windows: "
                  f"{' '.join(f'{s * 1e3:.0f}' for s in o['step_s'])}); others used {o['others_cores']:.2f} cores", flush=True)

    def med(rows, key):
        return median([r[key] for r in rows])

    sb, so = med(bare, "steady_step_s"), med(orch, "steady_step_s")
    pooled_b = median([s for r in bare for s in r["step_s"][1:]])
    pooled_o = median([s for r in orch for s in r["step_s"][1:]])
    print()
    print(f"medians of {args.repeat} runs each                       bare    orchestrator   orch/bare")
    print(f"  steady-state step time (ms)              {sb * 1e3:10.1f} {so * 1e3:14.1f} {so / sb:11.3f}   (aim <= 1.05)")
    print(f"  the same, all steady windows pooled (ms) {pooled_b * 1e3:10.1f} {pooled_o * 1e3:14.1f} "
          f"{pooled_o / pooled_b:11.3f}")
    print(f"  end-to-end wall time (s)                 {med(bare, 'wall_s'):10.1f} {med(orch, 'wall_s'):14.1f} "
          f"{med(orch, 'wall_s') / med(bare, 'wall_s'):11.3f}")
    print(f"    Ray start (s)                          {'-':>10} {med(orch, 'ray_start_s'):14.1f}")
    print(f"    plan + record before the stage (s)     {'-':>10} {med(orch, 'before_stage_s'):14.2f}")
    print(f"    start -> training loop (s)             {med(bare, 'pre_loop_s'):10.1f} {med(orch, 'pre_loop_s'):14.1f}")
    print(f"    training loop, 0 -> last report (s)    {med(bare, 'loop_s'):10.1f} {med(orch, 'loop_s'):14.1f}")
    print(f"    last report -> end (s)                 {med(bare, 'post_loop_s'):10.1f} {med(orch, 'post_loop_s'):14.1f}")
    print(f"    stage commit + record after (s)        {'-':>10} {med(orch, 'after_stage_s'):14.2f}")
    print(f"  empty Ray Train worker group, fit() (s)  {'-':>10} {orch[-1]['empty_worker_group_s']:14.1f}   (once)")
    print(f"  Ray shutdown after the run (s, not in wall) {'-':>7} {med(orch, 'ray_shutdown_s'):14.1f}")
    print(f"  data fetch (tokenizer + shards, local storage, in this process): {fetch_s * 1e3:.0f} ms")
    print(f"  other processes on the machine used {med(bare, 'others_cores'):.2f} (bare runs) / "
          f"{med(orch, 'others_cores'):.2f} (orchestrator runs) cores")
    rank_cpu = {label: median([r["steady_cpu"]["by_name"].get(name, 0.0) * r["steady_step_s"] for r in rows])
                for label, rows, name in (("bare", bare, "jobs.train"), ("orch", orch, "ray::RayTrainWorker"))}
    print(f"  the 2 ranks' CPU per step, steady windows (CPU-s)  {rank_cpu['bare']:6.3f} {rank_cpu['orch']:14.3f} "
          f"{rank_cpu['orch'] / rank_cpu['bare']:11.3f}")
    print("  CPU by process (cores, median over runs), steady windows | start -> training loop:")
    for label, rows in (("bare", bare), ("orchestrator", orch)):
        print(f"    {label}: " + cpu_line(rows, "steady_cpu") + "  |  " + cpu_line(rows, "pre_loop_cpu"))
    e = orch[-1]["empty_worker_group_cpu"]
    print("    empty worker group fit(): " + ", ".join(f"{n} {c:.2f}" for n, c in list(e["by_name"].items())[:8]))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "data_uri": data_uri, "data_fetch_s": fetch_s, "bare": bare,
                       "orchestrator": orch}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
