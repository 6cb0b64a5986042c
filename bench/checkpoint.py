#!/usr/bin/env python3
"""Benchmark: what a checkpoint costs the training loop, and how fast our uploads go.

One process, world size 1 (gloo), a real DeepSpeed ZeRO-2 engine on CPU built by
`jobs.train._engine` (the loop's own code path), and a moto S3 server on 127.0.0.1 that this
script starts itself (in-process threads, as the tests run it).

  (a) stall     `CheckpointWriter.save()` with the background upload: the time it blocks the
                training thread, vs. a synchronous save + upload + commit of the same checkpoint
                (`save()` then `wait()` at once). Also the steps run while the upload is in
                flight, and how much slower they were than steps with nothing in flight (the
                upload shares the 2 cores, and the GIL with the in-process moto server).
  (b) upload    the checkpoint's files uploaded one after the other with `S3Storage.upload_file`,
                and the writer's own upload path, `CheckpointWriter._upload_and_commit` (sha256
                while uploading, the rank marker, the commit, retention; on files copied to where
                `save()` has DeepSpeed write them), vs. raw boto3 on a plain client:
                `client.upload_file` with the same `TransferConfig`, and one `s3transfer`
                `TransferManager` with every file submitted at once.

Every measurement is repeated `--repeat` times (interleaved) and the median counts.

    .venv/bin/python bench/checkpoint.py [--hidden 384 --layers 6 --vocab 8192] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # s3_server
from proc_cpu import CLOCK_TICKS, process_table  # noqa: E402

_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tree_cpu() -> float:
    """This process's CPU plus its live children's (the moto child with --moto-process)."""
    me = os.getpid()
    total = process_cpu() + sum(cpu for ppid, cpu in process_table().values() if ppid == me)
    return total


class LoadMeter:
    """CPU-seconds that everything else on this (shared) machine used meanwhile: /proc/stat's busy
    time minus this process's and its children's CPU."""

    @staticmethod
    def sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        busy = sum(cpu[i] for i in (0, 1, 2, 5, 6)) / CLOCK_TICKS  # user nice system irq softirq
        return time.perf_counter(), busy, tree_cpu()

    @staticmethod
    def others(a, b) -> float:
        """Average number of cores that other processes kept busy between samples a and b."""
        return max((b[1] - a[1]) - (b[2] - a[2]), 0.0) / (b[0] - a[0])


def dir_files(directory: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), directory): os.path.join(d, f)
            for d, _, names in os.walk(directory) for f in names}


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------

class _MotoProcess:
    """moto in a child process (--moto-process): this process's CPU is then the client's alone."""

    def __init__(self):
        code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from s3_server import start_moto_server; "
                "server, endpoint = start_moto_server(); print(endpoint, flush=True); time.sleep(1e9)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(REPO / "tests")], stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def start_s3(in_process: bool = True) -> tuple[object, str]:
    from s3_server import start_moto_server

    if in_process:
        server, endpoint = start_moto_server()
    else:
        server = _MotoProcess()
        endpoint = server.endpoint
    os.environ.update({**_S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    return server, endpoint


def build_engine(args):
    import deepspeed
    import torch

    from jobs.model import ModelSpec, llama_config, num_parameters
    from jobs.train import _engine
    from jobs.train_spec import TrainSpec

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    deepspeed.init_distributed(dist_backend="gloo")
    model = ModelSpec(preset=None, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.heads, intermediate_size=args.intermediate,
                      max_position_embeddings=args.seq_len)
    spec = TrainSpec(model=model, steps=10_000, micro_batch=args.micro_batch, zero_stage=2, warmup_steps=10,
                     precision="fp32", lr=1e-4)
    config = llama_config(model, args.vocab, eos_id=0, pad_id=1)
    engine, _, _ = _engine(spec, config, 1, False, torch.device("cpu"), None)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        t0 = time.perf_counter()
        tokens = torch.randint(2, args.vocab, (args.micro_batch, args.seq_len), generator=gen)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        return time.perf_counter() - t0

    return engine, config, step, num_parameters(config)


# --------------------------------------------------------------------------------------------
# (a) the training stall per checkpoint
# --------------------------------------------------------------------------------------------

def measure_stall(engine, config, step, bucket: str, work: str, args) -> dict:
    from jobs.checkpoint import CheckpointWriter, committed_steps
    from jobs.storage import open_storage

    ckpt = open_storage(f"s3://{bucket}/stall/ckpt")
    config_path = os.path.join(work, "config.json")
    config.to_json_file(config_path)
    extras = {"hf/config.json": config_path}
    writer = CheckpointWriter(ckpt, 0, 1, os.path.join(work, "stall"), keep_last=2, keep_every=0)
    upload_ends: list[float] = []
    thread_cpu: list[float] = []
    upload_and_commit = writer._upload_and_commit  # noqa: SLF001 (bench): when the thread is done, its CPU

    def timed_upload_and_commit(*a):
        c0 = time.thread_time()
        upload_and_commit(*a)
        thread_cpu.append(time.thread_time() - c0)
        upload_ends.append(time.perf_counter())

    writer._upload_and_commit = timed_upload_and_commit
    meta = {"data_position": 0, "seed": 0, "config_hash": "bench", "world_size": 1, "zero_stage": 2}

    ds_save_s: list[float] = []  # DeepSpeed's own save_checkpoint inside save(): the rest is the writer's
    ds_save = engine.save_checkpoint

    def timed_ds_save(*a, **kw):
        t = time.perf_counter()
        try:
            return ds_save(*a, **kw)
        finally:
            ds_save_s.append(time.perf_counter() - t)

    engine.save_checkpoint = timed_ds_save  # an instance attribute: removed at the end
    baseline = [step() for _ in range(args.baseline_steps)]  # nothing in flight
    done = 1_000
    rows = []
    for rep in range(args.repeat):
        load0 = LoadMeter.sample()
        # background: the loop's own path, training goes on while the upload runs
        done += 1
        t0 = time.perf_counter()
        writer.save(engine, done, {"step": done}, meta, extras)
        stall = time.perf_counter() - t0
        stall_ds = ds_save_s[-1]
        during = []
        while writer._upload is not None and writer._upload.is_alive():  # noqa: SLF001 (bench)
            during.append(step())
        writer.wait()
        window = upload_ends[-1] - t0  # save() called -> upload + commit + retention done
        # synchronous: save, upload, commit, retention, all on the training thread
        done += 1
        t0 = time.perf_counter()
        writer.save(engine, done, {"step": done}, meta, extras)
        sync_local = time.perf_counter() - t0
        c0 = process_cpu()
        writer.wait()
        sync = time.perf_counter() - t0
        upload_cpu = process_cpu() - c0  # the main thread only waits: the upload's CPU, client + moto
        base = median(baseline)
        others = LoadMeter.others(load0, LoadMeter.sample())
        rows.append({"others_cores": others, "stall_s": stall, "stall_deepspeed_s": stall_ds,
                     "sync_deepspeed_s": ds_save_s[-1], "sync_s": sync, "sync_local_save_s": sync_local,
                     "upload_window_s": window, "steps_during_upload": len(during),
                     "step_s_during_upload": median(during), "upload_process_cpu_s": upload_cpu,
                     "writer_thread_cpu_s": thread_cpu[-1],
                     "extra_step_time_s": sum(during) - len(during) * base})
        print(f"  stall rep {rep + 1}: save() blocked {stall:.3f} s; synchronous {sync:.3f} s "
              f"(local save {sync_local:.3f} s); background save+upload+commit took {window:.2f} s; "
              f"{len(during)} steps overlapped it at {median(during):.3f} s/step (baseline {base:.3f}); "
              f"other processes used {others:.2f} cores meanwhile", flush=True)
        baseline += [step() for _ in range(3)]
    del engine.save_checkpoint
    steps, ignored = committed_steps(ckpt)
    assert steps == [done, done - 1] and not ignored, (steps, ignored)  # committed, retention applied
    size = sum(o.size for o in ckpt.list(f"step-{done:08d}/"))
    med = {k: median([r[k] for r in rows]) for k in rows[0]}
    return {"rows": rows, "median": med, "baseline_step_s": median(baseline), "checkpoint_bytes": size}


# --------------------------------------------------------------------------------------------
# (b) upload throughput
# --------------------------------------------------------------------------------------------

def measure_upload(engine, bucket: str, work: str, args) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from s3transfer.manager import TransferManager

    from jobs.checkpoint import CheckpointWriter
    from jobs.commit import file_entry
    from jobs.storage import open_storage
    from jobs.storage_s3 import MULTIPART_BYTES, NUM_TRANSFER_THREADS

    src = os.path.join(work, "upload-src")
    engine.save_checkpoint(src, tag="bench", client_state={}, save_latest=False)
    files = dir_files(os.path.join(src, "bench"))
    total = sum(os.path.getsize(p) for p in files.values())
    same = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                          max_concurrency=NUM_TRANSFER_THREADS)
    raw = boto3.client("s3")  # a plain client: default botocore config
    s3 = open_storage(f"s3://{bucket}")

    def ours_storage(prefix):
        storage = s3.sub(prefix)
        for name, path in sorted(files.items()):
            storage.upload_file(path, name)

    writer_dir = os.path.join(work, "upload-writer")

    def stage_for_writer(prefix):
        """Untimed: a writer on `prefix`, and the files copied to where its save() has DeepSpeed
        write them (the upload deletes them), as DeepSpeed leaves them: just written, in the page
        cache."""
        writer = CheckpointWriter(s3.sub(prefix), 0, 1, writer_dir, keep_last=1, keep_every=0)
        staged = os.path.join(writer.local_dir, "bench")
        shutil.copytree(os.path.join(src, "bench"), staged)
        return writer, dir_files(staged), staged

    def ours_writer(prefix, staging):  # the writer's own path: upload with sha256, marker, commit, retention
        writer, staged_files, staged = staging
        writer._upload_and_commit(1, staged_files, {"bench": True}, staged)  # noqa: SLF001 (bench)
        writer.wait()  # raises what the upload raised
        assert not os.path.exists(staged)

    def raw_client(prefix):
        for name, path in sorted(files.items()):
            raw.upload_file(path, bucket, f"{prefix}/{name}", Config=same)

    def raw_manager(prefix):
        with TransferManager(raw, config=same) as manager:
            futures = [manager.upload(path, bucket, f"{prefix}/{name}") for name, path in sorted(files.items())]
            for f in futures:
                f.result()

    def raw_default(prefix):  # boto3's default TransferConfig (8 MB parts, 10 threads), for reference
        for name, path in sorted(files.items()):
            raw.upload_file(path, bucket, f"{prefix}/{name}")

    def sha_alone(prefix):  # no upload: what the writer's file_entry() costs before each upload
        for path in files.values():
            file_entry(path)

    contenders = {"ours: S3Storage.upload_file, serial": ours_storage,
                  "ours: CheckpointWriter._upload_and_commit": ours_writer,
                  "raw: client.upload_file, same TransferConfig": raw_client,
                  "raw: TransferManager, all files at once": raw_manager,
                  "raw: client.upload_file, default TransferConfig": raw_default,
                  "(sha256 of the files alone, no upload)": sha_alone}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    others = []
    for rep in range(args.repeat):
        load0 = LoadMeter.sample()
        order = list(contenders.items())
        if rep % 2:
            order.reverse()  # interleaved both ways: drift hits every contender alike
        for i, (name, fn) in enumerate(order):
            prefix = f"upload/r{rep}-{i}"
            if fn is ours_writer:
                staging = stage_for_writer(prefix)
                t0 = time.perf_counter()
                fn(prefix, staging)
            else:
                t0 = time.perf_counter()
                fn(prefix)
            times[name].append(time.perf_counter() - t0)
            s3.delete_prefix(prefix + "/")  # keep moto's store small
        others.append(LoadMeter.others(load0, LoadMeter.sample()))
        print(f"  upload rep {rep + 1}: " + ", ".join(f"{times[n][-1]:.2f}" for n in contenders)
              + f" s; other processes used {others[-1]:.2f} cores meanwhile", flush=True)
    sizes = {name: os.path.getsize(p) for name, p in files.items()}
    shutil.rmtree(src, ignore_errors=True)
    return {"files": sizes, "bytes": total, "seconds": times, "others_cores": others,
            "mb_per_s": {n: total / 1e6 / median(t) for n, t in times.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--baseline-steps", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--moto-process", action="store_true",
                        help="run moto in a child process instead of this one (the brief's setup is in-process)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    started = time.perf_counter()
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    server, endpoint = start_s3(in_process=not args.moto_process)
    import boto3

    bucket = "bench-checkpoint"
    boto3.client("s3").create_bucket(Bucket=bucket)
    work = tempfile.mkdtemp(prefix="bench-checkpoint-")
    try:
        engine, config, step, num_params = build_engine(args)
        for _ in range(3):  # warm up; also creates Adam's states, so the checkpoint has its full size
            step()
        print(f"model: {num_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}), ZeRO-2 fp32, world size 1, torch threads {torch.get_num_threads()}; "
              f"moto ({'a child process' if args.moto_process else 'in this process'}) at {endpoint}", flush=True)
        print("(a) stall per checkpoint", flush=True)
        stall = measure_stall(engine, config, step, bucket, work, args)
        print("(b) upload throughput", flush=True)
        upload = measure_upload(engine, bucket, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()

    m = stall["median"]
    mb = upload["mb_per_s"]
    ours, ours_w = mb["ours: S3Storage.upload_file, serial"], mb["ours: CheckpointWriter._upload_and_commit"]
    raw_same, raw_tm = mb["raw: client.upload_file, same TransferConfig"], mb["raw: TransferManager, all files at once"]
    print()
    print(f"checkpoint: {stall['checkpoint_bytes'] / 1e6:.1f} MB committed per step "
          f"({len(upload['files'])} DeepSpeed files, {upload['bytes'] / 1e6:.1f} MB: "
          + ", ".join(f"{n} {s / 1e6:.1f} MB" for n, s in upload["files"].items()) + ")")
    print(f"(a) medians of {args.repeat}:")
    print(f"    save() blocks training (background upload)   {m['stall_s']:8.3f} s")
    print(f"      of which DeepSpeed's save_checkpoint       {m['stall_deepspeed_s']:8.3f} s   "
          f"(to local disk; {m['sync_deepspeed_s']:.3f} s in the synchronous runs)")
    print(f"    synchronous save + upload + commit           {m['sync_s']:8.3f} s   (local save {m['sync_local_save_s']:.3f} s)")
    print(f"    ratio stall / synchronous                    {m['stall_s'] / m['sync_s']:8.3f}   (aim <= 0.05)")
    print(f"    background: save() called -> committed       {m['upload_window_s']:8.3f} s")
    print(f"    steps during the upload: {m['steps_during_upload']:.0f} at {m['step_s_during_upload']:.3f} s/step "
          f"vs {stall['baseline_step_s']:.3f} s/step with nothing in flight; extra step time "
          f"{m['extra_step_time_s']:.3f} s -> effective stall {m['stall_s'] + m['extra_step_time_s']:.3f} s, "
          f"ratio {(m['stall_s'] + m['extra_step_time_s']) / m['sync_s']:.3f}")
    print(f"    CPU per checkpoint upload: {m['upload_process_cpu_s']:.2f} CPU-s in the process during the synchronous "
          f"upload (boto3 client{'' if args.moto_process else ' + in-process moto server'}); the writer's own thread {m['writer_thread_cpu_s']:.2f} CPU-s "
          f"(sha256 and the commit; boto3's transfer threads not included)")
    print(f"    other processes on the machine used {median([r['others_cores'] for r in stall['rows']]):.2f} cores "
          f"(median over the repeats)")
    print(f"(b) upload of {upload['bytes'] / 1e6:.1f} MB, medians of {args.repeat} "
          f"(other processes used {median(upload['others_cores']):.2f} cores):")
    for name, rate in mb.items():
        if name.startswith("("):
            print(f"    {name:<48} {rate:8.1f} MB/s   ({median(upload['seconds'][name]):.2f} s)")
            continue
        print(f"    {name:<48} {rate:8.1f} MB/s   ({median(upload['seconds'][name]):.2f} s)")
    print(f"    ratio ours / raw same TransferConfig          {ours / raw_same:8.3f}   (aim >= 0.8)")
    print(f"    ratio ours / raw TransferManager (all files)  {ours / raw_tm:8.3f}")
    print(f"    ratio writer / raw same TransferConfig        {ours_w / raw_same:8.3f}   (sha256, marker, commit)")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "stall": stall, "upload": upload}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
