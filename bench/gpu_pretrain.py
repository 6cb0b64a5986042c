"""One GPU, no Ray: our training loop with each set of speed levers, next to plain PyTorch with
the same levers, at the largest micro batch that fits (issue 13).

For each model preset (default `1b` and `350m`; seq 2048, bf16; random token ids over a 32k
vocabulary: throughput depends on the vocabulary's size, not on the text) and each lever set --
`eager` (compile off, fused kernels off: what ran before the levers existed), `compile` (each
decoder layer compiled), `fused` (Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy),
`both` -- with activation checkpointing `none` and `selective` (attention `auto`, i.e. SDPA's
flash kernel, everywhere):

- ours: the loop every training stage runs, in-process: its engine (`jobs.train._engine`:
  jobs.model_init.build_model, jobs.speed.apply_speed with the TrainSpec's `speed:` section,
  DeepSpeed ZeRO-2 bf16) and its steps (`jobs.train._train_steps`, with a no-op checkpoint,
  report and tensorboard: a run's final checkpoint and export are not what is measured);
- plain: the same model built and sped up the same way (build_model + apply_speed with the same
  SpeedSpec), fp32 weights under torch.autocast(bf16), torch's fused AdamW with the loop's
  parameter groups, schedule and gradient clipping, the same micro batches in the same order
  (jobs.batch_stream.BatchStream), no DeepSpeed. It passes `use_cache=False`, as a careful
  training loop does; ours passes what jobs/train.py passes.

Micro batch: the largest power of two up to --max-micro-batch with which our loop runs 2 steps
without running out of device memory, found by doubling from 1 on one engine with compile off
(once per preset, kernels and activation checkpointing: a compiled configuration runs at its
eager twin's micro batch); an OOM in the measurement itself halves it. Plain runs at ours'
micro batch; where it does not fit, both are measured again at half of it, so that every ratio
compares the same batches.

Timing: --warmup steps first (compilation happens there; the last one is timed to size the
window), then as many steps as fill --timed-s (5 to 50) between two device synchronizations;
plain runs the same number of steps. tokens/s = steps x micro batch x seq / seconds; MFU =
tokens/s x jobs.model.flops_per_token / the device's stated dense bf16 peak
(jobs.train.PEAK_FLOPS); peak memory = torch.cuda.max_memory_allocated from the model's
construction to the end, reset between measurements.

Isolation: Liger patches transformers' Llama classes for the rest of a process, so lever sets
with fused kernels run in one worker process and those without in another (the parent orders
them freely); each measurement starts from torch.compiler.reset() and a freed device, and says
how much memory its predecessor left behind.

Budget: phases in order of what they tell -- both levers (no activation checkpointing), the
eager baselines, compile only and fused only, selective activation checkpointing -- each with a
share of --budget seconds (what one leaves passes to the next); a configuration starts only
while its phase has time and the whole budget has MIN_CONFIG_S left; the rest is printed as
skipped. Output: a table per preset, the goals met or not, one JSON line per search and
measurement and a summary line appended to --json.

    python bench/gpu_pretrain.py --json bench/.out/gpu_pretrain.jsonl   # one GPU, ~5 minutes
    python bench/gpu_pretrain.py --smoke   # the same code paths on a CPU: tiny, seq 64, fp32
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.metadata
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import weakref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

LEVERS = {"eager": ("off", "off"), "compile": ("layers", "off"), "fused": ("off", "liger"),
          "both": ("layers", "liger")}  # lever set -> (speed.compile, speed.fused_kernels)
PHASES = (  # (name, share of the budget, (lever set, activation checkpointing) in order)
    ("both levers", 0.50, (("both", "none"),)),
    ("eager baselines (today)", 0.25, (("eager", "none"),)),
    ("compile only, fused only", 0.15, (("compile", "none"), ("fused", "none"))),
    ("selective activation checkpointing", 0.10,
     (("both", "selective"), ("eager", "selective"), ("compile", "selective"), ("fused", "selective"))),
)
GOAL_MFU = {"1b": 0.50, "350m": 0.40}
GOAL_RATIO = 0.97
MIN_CONFIG_S = 30  # seconds of the whole budget a configuration needs left to start
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 5, 50
SMOKE = dict(presets="tiny", seq_len=64, vocab=512, max_micro_batch=8, warmup=2, steps=3, budget=900,
             fake_oom_above="4")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = tempfile.mkdtemp(prefix="gpu-bench-")
    signal.signal(signal.SIGTERM, _exit_on_signal)  # `timeout` stops us: still print, then stop the workers
    bench = Bench(args, _write_data(args, work), work)
    try:
        bench.run()
    finally:
        bench.report()
        bench.close()
    return 1 if bench.failures else 0


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", help="comma-separated model presets (default 1b,350m)")
    parser.add_argument("--levers", default=",".join(LEVERS), help="lever sets to run: eager,compile,fused,both")
    parser.add_argument("--ac", default="none,selective", help="activation checkpointing modes to run")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--max-micro-batch", type=int, help="the search's cap (default 64)")
    parser.add_argument("--micro-batch", type=int, help="measure at this micro batch instead of searching")
    parser.add_argument("--warmup", type=int, help="untimed steps before the timed ones, at least 2 (default 3)")
    parser.add_argument("--timed-s", type=float, default=5.0, help="seconds the timed steps should fill")
    parser.add_argument("--steps", type=int, help="timed steps (instead of --timed-s)")
    parser.add_argument("--budget", type=float, help="seconds for the whole matrix (default 270)")
    parser.add_argument("--json", help="append one JSON line per search and measurement, and a summary")
    parser.add_argument("--log", help="the workers' output (DeepSpeed, torch); default: a temporary file")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of every code path: tiny, seq 64, fp32, 3 timed steps, fake OOM above 4")
    parser.add_argument("--fake-oom-above", help="OURS[,PLAIN]: raise OutOfMemoryError on larger micro batches "
                                                 "(for checking the search and fallbacks without a GPU)")
    args = parser.parse_args(argv)
    defaults = dict(presets="1b,350m", seq_len=2048, vocab=32000, max_micro_batch=64, warmup=3, budget=270)
    for name, value in {**defaults, **(SMOKE if args.smoke else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.presets, args.levers, args.ac = (value.split(",") for value in (args.presets, args.levers, args.ac))
    from jobs.model import PRESETS

    for name in args.presets:
        if name not in PRESETS:
            parser.error(f"--presets: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    for name in args.levers:
        if name not in LEVERS:
            parser.error(f"--levers: unknown lever set {name!r}; choose from {', '.join(LEVERS)}")
    for mode in args.ac:
        if mode not in ("none", "selective", "full"):
            parser.error(f"--ac: unknown mode {mode!r}; choose from none, selective, full")
    if args.warmup < 2:
        parser.error("--warmup must be at least 2: the last warm-up step is timed to size the window")
    caps = [int(n) for n in args.fake_oom_above.split(",")] if args.fake_oom_above else []
    args.fake_oom = {"ours": caps[0], "plain": caps[-1]} if caps else {}
    return args


def _write_data(args, work: str) -> str:
    from packed import read_texts, write_packed_stage

    texts = read_texts(sorted(glob.glob(os.path.join(REPO, "examples", "data", "*.jsonl"))))
    num_sequences = max(4 * args.max_micro_batch, 64)  # an epoch wraps around: any number of steps
    data_dir = os.path.join(work, "corpus")
    write_packed_stage(data_dir, texts, vocab_size=args.vocab, seq_len=args.seq_len,
                       random_tokens=num_sequences * args.seq_len)
    return data_dir


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# --- the parent: orders the configurations, keeps the budget, prints ---------------------------

class Bench:
    def __init__(self, args, data_dir: str, work: str):
        self.args = args
        self.log = args.log or os.path.join(work, "workers.log")
        self.setup = {"data_dir": data_dir, "cache_dir": os.path.join(work, "cache"), "seq_len": args.seq_len,
                      "smoke": args.smoke, "fake_oom": args.fake_oom, "warmup": args.warmup,
                      "timed_s": args.timed_s, "steps": args.steps, "log": self.log}
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.workers: dict[str, Worker] = {}
        self.unavailable: dict[str, str] = {}  # worker key -> why its configurations cannot run
        self.micro_batches: dict[tuple, int] = {}  # (preset, worker key, ac) -> the search's answer
        self.rows: list[dict] = []  # measurements that ran
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.failures: list[str] = []
        self.device: dict | None = None
        print(f"workers' output: {self.log}", flush=True)
        for key in dict.fromkeys(_worker_key(lever) for lever in args.levers):  # imports overlap the first work
            self.workers[key] = Worker(key, {**self.setup, "port": _free_port()})

    def run(self) -> None:
        phases = [(name, share, [(lever, ac) for lever, ac in items if lever in self.args.levers and ac in self.args.ac])
                  for name, share, items in PHASES]
        if "full" in self.args.ac:
            phases.append(("full activation checkpointing", 0.10, [(lever, "full") for lever in self.args.levers]))
        phases = [phase for phase in phases if phase[2]]
        total, done = sum(share for _, share, _ in phases), 0.0
        for name, share, items in phases:
            done += share
            phase_end = self.start + self.args.budget * done / total
            for lever, ac in items:
                for preset in self.args.presets:
                    label, now, key = f"{preset} {lever} AC {ac}", time.monotonic(), _worker_key(lever)
                    if key in self.unavailable:
                        self._skip(label, self.unavailable[key])
                    elif now >= phase_end:
                        self._skip(label, f"the phase '{name}' had no time left")
                    elif self.deadline - now < MIN_CONFIG_S:
                        self._skip(label, f"less than {MIN_CONFIG_S} s of the budget left")
                    else:
                        self._config(preset, lever, ac, label)

    def _config(self, preset: str, lever: str, ac: str, label: str) -> None:
        compile_, fused = LEVERS[lever]
        if self.args.smoke and fused != "off":
            fused = "auto"  # a CPU has no fused kernels: auto says so ("off (auto: no GPU)")
        key = _worker_key(lever)
        base = {"preset": preset, "lever": lever, "ac": ac, "speed": {"compile": compile_, "fused_kernels": fused,
                                                                       "attention": "auto",
                                                                       "activation_checkpointing": ac}}
        micro_batch = self.args.micro_batch or self.micro_batches.get((preset, key, ac))
        if micro_batch is None:
            reply = self._call(key, {"op": "search", **base, "cap": self.args.max_micro_batch}, label)
            if reply["status"] != "ok":
                return
            trials = " ".join(f"{t['micro_batch']}" + (" (OOM)" if not t["fits"] else f" ({t['peak_gib']:.1f} GiB)"
                                                      if t["peak_gib"] is not None else "") for t in reply["trials"])
            self._say(f"{label}: search: {trials} -> micro batch {reply['micro_batch']}")
            self._json({"kind": "search", **base, **reply})
            micro_batch = self.micro_batches[(preset, key, ac)] = reply["micro_batch"]
            if not micro_batch:
                self.notes.append(f"{label}: micro batch 1 does not fit")
                return
        ours = self._fitting(key, base, micro_batch, label)
        if ours is None:
            return
        plain = self._measure(key, base, "plain", ours["micro_batch"], ours["steps"], label)
        if plain and plain["status"] == "oom" and ours["micro_batch"] > 1:
            half = ours["micro_batch"] // 2
            self.notes.append(f"{label}: plain does not fit micro batch {ours['micro_batch']}; both again at {half}")
            ours = self._measure(key, base, "ours", half, None, label)
            if ours and ours["status"] == "ok":
                plain = self._measure(key, base, "plain", half, ours["steps"], label)
        if ours and plain and ours["status"] == plain["status"] == "ok":
            ours["ratio"] = ours["tokens_per_s"] / plain["tokens_per_s"]
            self._say(f"{label}: ours / plain = {ours['ratio']:.3f}")
            self._json({"kind": "pair", **base, "micro_batch": ours["micro_batch"], "ratio": ours["ratio"]})

    def _fitting(self, key: str, base: dict, micro_batch: int, label: str) -> dict | None:
        """Ours at micro_batch, halved while it runs out of memory."""
        while micro_batch >= 1:
            ours = self._measure(key, base, "ours", micro_batch, None, label)
            if not ours or ours["status"] != "oom":
                return ours if ours and ours["status"] == "ok" else None
            self.notes.append(f"{label}: ours ran out of memory at micro batch {micro_batch}, which its search fitted "
                              "with compile off; halved")
            micro_batch //= 2
        return None

    def _measure(self, key: str, base: dict, contender: str, micro_batch: int, steps: int | None,
                 label: str) -> dict | None:
        if self.deadline - time.monotonic() < 5:
            self._skip(f"{label} {contender}", "the budget is spent")
            return None
        reply = self._call(key, {"op": "measure", **base, "contender": contender, "micro_batch": micro_batch,
                                 "steps": steps}, label)
        if reply["status"] == "oom":
            self._say(f"{label}: {contender} at micro batch {micro_batch}: out of memory")
            self._json({"kind": "measurement", **base, "contender": contender, "micro_batch": micro_batch,
                        "status": "oom"})
        elif reply["status"] == "ok":
            row = {**base, "contender": contender, **reply}
            self.rows.append(row)
            self._say(f"{label}: {contender:5} micro batch {row['micro_batch']} x {row['steps']} steps: "
                      f"{row['tokens_per_s']:,.0f} tokens/s, MFU {_pct(row['mfu'])}, {row['tflops']:.1f} TFLOP/s, "
                      f"peak {_gib(row['peak_gib'])} GiB, loss {row['loss']:.4f} "
                      f"(setup {row['setup_s']:.1f} s, warm-up {row['warmup_s']:.1f} s)")
            self._json({"kind": "measurement", **row})
            return row
        return reply

    def _call(self, key: str, request: dict, label: str) -> dict:
        worker = self.workers.get(key)
        if worker is None or not worker.alive():
            worker = self.workers[key] = Worker(key, {**self.setup, "port": _free_port()})
        reply = worker.call(request, self.deadline)
        if worker.info and self.device is None:
            self.device = worker.info
            self._header()
        if reply["status"] == "refused":  # a lever this machine cannot run (liger-kernel missing)
            self.unavailable[key] = reply["error"]
            self._skip(label, reply["error"])
        elif reply["status"] == "timeout":  # the budget's end, not an error: the rest is skipped too
            self._skip(f"{label} {request['op']} {request.get('contender', '')}".rstrip(),
                       "stopped: it ran past the end of the budget")
        elif reply["status"] == "failed":
            what = f"{request['op']} {request.get('contender', '')}".rstrip()
            self.failures.append(f"{label} {what}")
            self._say(f"{label}: {what} failed:\n{reply.get('error', '')}"
                      f"\n--- the workers' output, last lines ---\n{_tail(self.log)}")
            if reply.get("startup"):
                last = (reply.get("error") or "").strip().splitlines() or ["?"]
                self.unavailable[key] = f"its worker could not start: {last[-1]}"
            self._json({"kind": request["op"], **{k: v for k, v in request.items() if k != "op"}, **reply})
        return reply

    def _header(self) -> None:
        d = self.device
        print(f"device: {d['device']}, {_gib(d['memory_gib'])} GiB; stated dense bf16 peak: "
              f"{d['peak_flops'] / 1e12:.0f} TFLOP/s" if d["peak_flops"] else f"device: {d['device']}; no stated peak: "
              "MFU n/a", flush=True)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()), flush=True)

    def _skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        self._say(f"{what}: skipped ({why})")

    def _say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.start:5.0f} s] {line}", flush=True)

    def _json(self, record: dict) -> None:
        if self.args.json:
            record = {"run": self.run_id, "seq_len": self.args.seq_len, "vocab": self.args.vocab,
                      "device": (self.device or {}).get("device"), **record}
            with open(self.args.json, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def report(self) -> None:
        d = self.device or {}
        for preset in self.args.presets:
            rows = [r for r in self.rows if r["preset"] == preset]
            if not rows:
                continue
            r0 = rows[0]
            print(f"\n{d.get('device', '?')} · preset {preset}: {r0['params'] / 1e6:,.1f}M parameters, "
                  f"{r0['flops_per_token'] / 1e9:.3g} GFLOP per token · seq {self.args.seq_len} · "
                  f"{'bf16' if not self.args.smoke else 'fp32'}")
            header = ("config", "AC", "who", "micro batch", "steps", "tokens/s", "MFU", "TFLOP/s", "peak GiB", "loss",
                      "ours/plain")
            table = [header] + [(r["lever"], r["ac"], r["contender"], str(r["micro_batch"]), str(r["steps"]),
                                 f"{r['tokens_per_s']:,.0f}", _pct(r["mfu"]), f"{r['tflops']:.1f}",
                                 _gib(r["peak_gib"]), f"{r['loss']:.4f}",
                                 f"{r['ratio']:.3f}" if "ratio" in r else "") for r in rows]
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for row in table:
                print("  " + "  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                                       for i, (cell, w) in enumerate(zip(row, widths))))
            for r in rows:
                print(f"  {r['lever']} AC {r['ac']} {r['contender']}: " + "; ".join(_row_notes(r)))
        for note in self.notes:
            print(f"note: {note}")
        goals = self._goals()
        print("\ngoals:")
        for line in goals:
            print(f"  {line}")
        if self.skipped:
            print(f"skipped ({len(self.skipped)}):")
            for line in self.skipped:
                print(f"  {line}")
        for line in self.failures:
            print(f"FAILED: {line}")
        self._json({"kind": "summary", "goals": goals, "skipped": self.skipped, "failures": self.failures,
                    "notes": self.notes, "elapsed_s": time.monotonic() - self.start, "versions": d.get("versions")})

    def _goals(self) -> list[str]:
        lines = []
        for preset, goal in GOAL_MFU.items():
            ours = [r for r in self.rows if r["preset"] == preset and r["contender"] == "ours" and r["mfu"] is not None]
            if not ours:
                lines.append(f"{preset} MFU >= {goal:.0%}: not measured")
                continue
            best = max(ours, key=lambda r: r["mfu"])
            lines.append(f"{preset} MFU >= {goal:.0%}: {'met' if best['mfu'] >= goal else 'NOT met'} (best ours "
                         f"{best['mfu']:.1%}: {best['lever']}, AC {best['ac']}, micro batch {best['micro_batch']})")
        pairs = [r for r in self.rows if "ratio" in r]
        if not pairs:
            lines.append(f"ours >= {GOAL_RATIO} x plain, same levers: not measured")
        else:
            low = min(pairs, key=lambda r: r["ratio"])
            met = sum(r["ratio"] >= GOAL_RATIO for r in pairs)
            lines.append(f"ours >= {GOAL_RATIO} x plain, same levers: {'met' if met == len(pairs) else 'NOT met'}: "
                         f"{met} of {len(pairs)} pairs at or above (lowest {low['ratio']:.3f}: {low['preset']} "
                         f"{low['lever']} AC {low['ac']})")
        return lines


def _row_notes(r: dict) -> list[str]:
    notes = [", ".join(f"{lever.replace('_', ' ')} {how}" for lever, how in r["ran"].items())]
    if r.get("loop_tokens_per_s") and abs(r["loop_tokens_per_s"] / r["tokens_per_s"] - 1) > 0.02:
        notes.append(f"the loop's own report said {r['loop_tokens_per_s']:,.0f} tokens/s")
    compiled = r["dynamo"]
    if compiled["frames"]:
        notes.append(f"dynamo: {compiled['graphs']} graph(s) from {compiled['frames']} frame(s), "
                     f"{compiled['frames'] - compiled['frames_ok']} given up (left eager), "
                     f"{compiled['graph_breaks']} graph break(s)"
                     + (f" ({'; '.join(reason.strip().splitlines()[0] for reason in compiled['break_reasons'])})"
                        if compiled["break_reasons"] else ""))
    if r["speed"]["compile"] != "off" and not compiled["graphs"]:
        notes.append("COMPILE HAD NO EFFECT: no graph was compiled")
    elif r["speed"]["compile"] == "layers" and compiled["graphs"] > 1:
        given_up = compiled["frames"] - compiled["frames_ok"]
        notes.append(f"{compiled['graphs']} graphs where the layers should share one: dynamo recompiled per layer"
                     + (f", and gave up on {given_up} frame(s) at its recompile limit: those layers ran eager"
                        if given_up else ""))
    if compiled["graphs_while_timed"]:
        notes.append(f"{compiled['graphs_while_timed']} graph(s) compiled during the timed steps: the timing is off")
    if r["leftover_gib"] and r["leftover_gib"] > 0.5:
        notes.append(f"the previous measurement left {r['leftover_gib']:.1f} GiB allocated")
    if not r["freed"]:
        notes.append("its model was not freed afterwards")
    return notes


def _worker_key(lever: str) -> str:
    """Liger patches transformers' classes process-wide: fused and unfused sets never share a process."""
    return "fused" if LEVERS[lever][1] != "off" else "unfused"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(value) -> str:
    return f"{value:.1%}" if value is not None else "n/a"


def _gib(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Worker:
    """A process that runs searches and measurements one at a time for the parent (spawned: no
    CUDA state is inherited). It dies with the parent, and on any error but an OOM or a refused
    lever (the device may be left unusable); the parent starts another when it needs one."""

    def __init__(self, key: str, setup: dict):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, setup), name=f"bench-{key}")
        self.process.start()
        child.close()
        self.info: dict | None = None

    def alive(self) -> bool:
        return self.process.is_alive()

    def call(self, request: dict, deadline: float) -> dict:
        if self.info is None:
            ready = self._receive(deadline)
            if ready["status"] != "ready":
                return {**ready, "startup": True}
            self.info = ready
        self.conn.send(request)
        return self._receive(deadline)

    def _receive(self, deadline: float) -> dict:
        try:
            if not self.conn.poll(max(deadline - time.monotonic(), 0)):
                self.stop(wait_s=0)
                return {"status": "timeout"}
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.stop()
            return {"status": "failed", "error": "the worker process died"}
        if reply.get("fatal"):
            self.stop()
        return reply

    def stop(self, wait_s: float = 5) -> None:
        """Ask it to exit; kill it if it does not within wait_s (it may be in the middle of a step)."""
        if self.process.is_alive() and wait_s:
            try:
                self.conn.send({"op": "exit"})
            except OSError:
                pass
            self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# --- the worker: builds, steps, times, frees ---------------------------------------------------

def _worker_main(conn, setup: dict) -> None:
    _die_with_parent()
    log = os.open(setup["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(setup["port"]))
    if setup["smoke"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        steps = Steps(setup)
    except BaseException:
        conn.send({"status": "failed", "error": traceback.format_exc()[-3000:], "fatal": True})
        return
    conn.send({"status": "ready", **steps.info})
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request["op"] == "exit":
            return
        reply = steps.handle(request)
        conn.send(reply)
        if reply.get("fatal"):
            return


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker that outlived the parent would hold the GPU for the tests after it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class _NoTensorboard:
    def add_scalar(self, *args, **kwargs) -> None:
        pass


def _ignore(*args) -> None:
    pass


class Steps:
    def __init__(self, setup: dict):
        import deepspeed
        import torch
        import transformers

        from jobs import train as loop
        from jobs.data import PackedTokens

        self.torch, self.loop, self.setup = torch, loop, setup
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.device = loop._device()
        self.cuda = self.device.type == "cuda"
        if not self.cuda and not setup["smoke"]:
            raise SystemExit("no CUDA device here: run with --smoke on a CPU")
        self.bf16 = not setup["smoke"]
        self.data = PackedTokens(f"file://{setup['data_dir']}", "train", setup["cache_dir"])
        assert self.data.seq_len == setup["seq_len"]
        self.peak = loop._peak_flops(self.device)
        self.configs: dict[str, object] = {}
        versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "deepspeed": deepspeed.__version__}
        try:
            versions["liger-kernel"] = importlib.metadata.version("liger-kernel")
        except importlib.metadata.PackageNotFoundError:
            versions["liger-kernel"] = "not installed"
        self.info = {"device": torch.cuda.get_device_name(self.device) if self.cuda else "CPU",
                     "memory_gib": torch.cuda.get_device_properties(self.device).total_memory / 2**30 if self.cuda
                     else None, "peak_flops": self.peak, "versions": versions}

    def handle(self, request: dict) -> dict:
        try:
            reply = {"status": "ok", **(self.search(request) if request["op"] == "search" else self.measure(request))}
        except Exception as e:  # the frames holding the model go with the traceback, at the end of this block
            if _is_oom(e):
                reply = {"status": "oom", "error": str(e).splitlines()[0][:300] if str(e) else "out of memory"}
            elif isinstance(e, ValueError) and str(e).startswith("speed."):
                reply = {"status": "refused", "error": str(e)}
            else:
                reply = {"status": "failed", "error": traceback.format_exc()[-3000:], "fatal": True}
        self._free()
        return reply

    def search(self, req: dict) -> dict:
        """The largest power of two up to req['cap'] with which 2 steps of our loop fit, compile off."""
        torch = self.torch
        self._free()
        spec = self._spec(req, micro_batch=1, compile_="off")
        engine, context, facts = self.loop._engine(spec, self._config(req["preset"]), 1, self.bf16, self.device, None)
        self._fake_oom(engine.module, "ours")
        trials = []
        try:
            with context:
                micro_batch = 1
                while micro_batch <= req["cap"]:
                    if self.cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(self.device)
                    try:
                        self._ours_steps(engine, spec.model_copy(update={"micro_batch": micro_batch}), 0, 2)
                    except Exception as e:
                        if not _is_oom(e):
                            raise
                        trials.append({"micro_batch": micro_batch, "fits": False, "peak_gib": None})
                        break
                    trials.append({"micro_batch": micro_batch, "fits": True, "peak_gib": self._peak_gib()})
                    micro_batch *= 2
        finally:
            engine.destroy()
        fits = [t["micro_batch"] for t in trials if t["fits"]]
        return {"micro_batch": max(fits, default=0), "trials": trials, "ran": facts["speed"]}

    def measure(self, req: dict) -> dict:
        torch = self.torch
        leftover = self._free()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        spec = self._spec(req, micro_batch=req["micro_batch"], compile_=req["speed"]["compile"])
        config = self._config(req["preset"])
        dynamo = _dynamo_counts()
        started = time.perf_counter()
        run, context, ran, close, model = (self._ours if req["contender"] == "ours" else self._plain)(spec, config)
        watch = weakref.ref(model)
        del model
        setup_s = time.perf_counter() - started
        warmup = self.setup["warmup"]
        try:
            with context:
                run(0, warmup - 1)
                one_step, _ = self._timed(run, warmup - 1, warmup)
                warmup_s = time.perf_counter() - started - setup_s
                steps = req["steps"] or self.setup["steps"] or min(max(
                    math.ceil(self.setup["timed_s"] / one_step), MIN_TIMED_STEPS), MAX_TIMED_STEPS)
                before_timed = _dynamo_counts()
                seconds, metrics = self._timed(run, warmup, warmup + steps)
                after = _dynamo_counts()
        finally:
            close()
        peak = self._peak_gib()
        del run, context, close
        self._free()
        tokens_per_s = steps * spec.micro_batch * self.data.seq_len / seconds
        throughput = self._throughput(config, spec).of(tokens_per_s)
        return {"micro_batch": spec.micro_batch, "steps": steps, "seconds": seconds, "tokens_per_s": tokens_per_s,
                "mfu": throughput["mfu"], "tflops": throughput["tflops_per_device"], "peak_gib": peak,
                "loss": metrics["loss"], "loop_tokens_per_s": metrics.get("tokens_per_s"), "setup_s": setup_s,
                "warmup_s": warmup_s, "ran": ran, "leftover_gib": leftover, "freed": watch() is None,
                "params": _num_parameters(config), "flops_per_token": self._throughput(config, spec).flops_per_token,
                "dynamo": _dynamo_delta(dynamo, before_timed, after)}

    def _ours(self, spec, config):
        """Our loop: the engine jobs/train.py builds, stepped by its _train_steps."""
        engine, context, facts = self.loop._engine(spec, config, 1, self.bf16, self.device, None)
        self._fake_oom(engine.module, "ours")

        def run(start: int, end: int) -> dict:
            return self._ours_steps(engine, spec, start, end)
        return run, context, facts["speed"], engine.destroy, engine.module

    def _ours_steps(self, engine, spec, start: int, end: int) -> dict:
        from jobs.data import BatchOrder

        order = BatchOrder(len(self.data), spec.micro_batch, 1, 1, spec.seed)
        metrics: dict = {}
        self.loop._train_steps(engine, spec.model_copy(update={"steps": end}), self.data, order, start, 0, 1,
                               self.device, _ignore, metrics, self._throughput(self._config(spec.model.preset), spec),
                               _NoTensorboard(), _ignore)
        return metrics

    def _plain(self, spec, config):
        """The same model and levers in a plain PyTorch loop: fp32 weights, autocast bf16, AdamW."""
        torch = self.torch
        from jobs.batch_stream import BatchStream
        from jobs.data import BatchOrder
        from jobs.model_init import build_model
        from jobs.speed import apply_speed

        model = build_model(config, ds_config={}, zero3=False, seed=spec.seed, device=self.device)
        ran, context = apply_speed(model, spec.speed, self.device, torch.bfloat16 if self.bf16 else torch.float32,
                                   False)
        self._fake_oom(model, "plain")
        torch.manual_seed(spec.seed)
        params = list(model.parameters())  # the loop's groups: no decay on vectors (norms)
        optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
                                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                      lr=spec.lr, betas=spec.betas, fused=self.cuda)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.loop._warmup_cosine(spec))
        order = BatchOrder(len(self.data), spec.micro_batch, 1, 1, spec.seed)
        del params

        def run(start: int, end: int) -> dict:
            window = torch.zeros((), dtype=torch.float64, device=self.device)
            with BatchStream(self.data, order, 0, start, end, self.device) as batches:
                for _ in range(start, end):
                    tokens, labels = next(batches)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        loss = model(input_ids=tokens, labels=labels, use_cache=False).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    window += loss.detach().double()
            return {"loss": float(window) / (end - start)}

        def close() -> None:
            optimizer.state.clear()
        return run, context, ran, close, model

    def _spec(self, req: dict, micro_batch: int, compile_: str):
        from jobs.model import ModelSpec
        from jobs.train_spec import SpeedSpec, TrainSpec

        return TrainSpec(model=ModelSpec(preset=req["preset"], max_position_embeddings=self.data.seq_len),
                         steps=1, micro_batch=micro_batch, zero_stage=2, precision="bf16" if self.bf16 else "fp32",
                         log_every=10**9, checkpoint_every=10**9,
                         speed=SpeedSpec(**{**req["speed"], "compile": compile_}))

    def _config(self, preset: str):
        if preset not in self.configs:
            from jobs.model import ModelSpec, llama_config

            self.configs[preset] = llama_config(ModelSpec(preset=preset, max_position_embeddings=self.data.seq_len),
                                                self.data.vocab_size, self.data.eos_id, None)
        return self.configs[preset]

    def _throughput(self, config, spec):
        from jobs.model import flops_per_token

        return self.loop.Throughput(flops_per_token(config, self.data.seq_len), self.peak, 1,
                                    spec.micro_batch * self.data.seq_len)

    def _timed(self, run, start: int, end: int) -> tuple[float, dict]:
        self._sync()
        began = time.perf_counter()
        out = run(start, end)
        self._sync()
        return time.perf_counter() - began, out

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def _fake_oom(self, module, contender: str) -> None:
        cap = self.setup["fake_oom"].get(contender)
        if cap is None:
            return

        def hook(module, args, kwargs):
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is not None and tokens.shape[0] > cap:
                raise self.torch.OutOfMemoryError(f"fake: {contender} pretends micro batch {tokens.shape[0]} > {cap} "
                                                  "does not fit")
        module.register_forward_pre_hook(hook, with_kwargs=True)

    def _free(self) -> float | None:
        """Collect what the last search or measurement built; the device memory still allocated."""
        self.torch.compiler.reset()  # first: dynamo's caches may hold the last model's modules
        gc.collect()
        if not self.cuda:
            return None
        self.torch.cuda.empty_cache()
        return self.torch.cuda.memory_allocated(self.device) / 2**30


def _is_oom(e: BaseException) -> bool:
    import torch

    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or any(
                text in str(e) for text in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA_ERROR_OUT_OF_MEMORY")):
            return True
        e = e.__cause__
    return False


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["total"], "frames_ok": counters["frames"]["ok"],
            "graphs": counters["stats"]["unique_graphs"], "breaks": dict(counters["graph_break"])}


def _dynamo_delta(before: dict, timed: dict, after: dict) -> dict:
    """What dynamo did during one measurement: frames it saw, those it gave up on (its recompile
    limit), graphs it compiled, graph breaks and their reasons, graphs compiled while timed."""
    breaks = {reason: n - before["breaks"].get(reason, 0) for reason, n in after["breaks"].items()
              if n > before["breaks"].get(reason, 0)}
    return {"frames": after["frames"] - before["frames"], "frames_ok": after["frames_ok"] - before["frames_ok"],
            "graphs": after["graphs"] - before["graphs"], "graph_breaks": sum(breaks.values()),
            "break_reasons": sorted(breaks, key=breaks.get, reverse=True)[:3],
            "graphs_while_timed": after["graphs"] - timed["graphs"]}


def _num_parameters(config) -> int:
    from jobs.model import num_parameters

    return num_parameters(config)


if __name__ == "__main__":
    sys.exit(main())
