"""Soak test of interrupted training (not run in CI): `kill -9` a `bertqa train --resume` run at random moments,
again and again, until it finishes; then check that it ends exactly where an uninterrupted run ends.

    .venv/bin/python scripts/soak_resume.py --model MODEL --train-file SQUAD.json --workdir runs/soak \\
        [--cycles 30] [--steps 40] [--save-every 4] [--seed 0]

MODEL is any HF BERT folder, e.g. runs/all-MiniLM-L6-v2 (its encoder, with a fresh QA head), or a tiny random
one made with transformers (hidden 32, 2 layers, as tests/conftest.py's `tiny_dir`) for fast cycles;
tests/data/tiny-squad.json is a small SQuAD file. The workdir must be new or empty: it gets `reference/`
(one uninterrupted run), `interrupted/` (the killed and resumed one) and `logs/` (each start's output).

Each cycle starts the run with --resume and kills it at a random moment: one in four while it loads, the
others at a random step of the next three checkpoints' worth plus a random part of a step (so in a step or
a checkpoint write) or, after the last step, in the final save. The cycles go on until a start finishes
before its kill; after --cycles kills the run is let finish. Before every start, checkpoint.pt (if any) must
load and be at a save point.

Prints cycles run, kills that landed mid checkpoint write (a stray temporary file was left), the most steps
lost to a kill (steps logged before the kill minus the step the next start resumed from; at most
--save-every), and whether the final weights and per-step losses matched the reference. Exits 1 on any
mismatch, a damaged checkpoint, a start that failed, temporary files left at the end, or more steps lost
than --save-every.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from bertqa.files import folder_for
from bertqa.squad.features import check_window_params


def train_cmd(a, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "bertqa", "train", "--model", a.model, "--train-file", a.train_file,
           "--output-dir", str(out), "--max-steps", str(a.steps), "--save-every", str(a.save_every),
           "--seed", str(a.seed), "--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length),
           "--doc-stride", str(a.max_seq_length // 2), "--max-query-length", "32", "--log-every", "1",
           "--precision", "fp32", "--device", "cpu", "--cache-dir", "none", "--no-progress"]  # fmt: skip
    return cmd + ["--resume"] if resume else cmd


def logged_steps(out: Path) -> int:
    """The last step in metrics.jsonl (one line a step); a line cut short by the kill is not counted."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1]]
    return max(steps, default=0)


def wait_until_training(proc, log_path: Path) -> None:
    """Until the run has loaded everything and printed its plan (or has ended)."""
    while proc.poll() is None and "training features" not in log_path.read_text():
        time.sleep(0.01)


def wait_for_step(proc, out: Path, since: float, target: int) -> float | None:
    """Until this start has logged step `target` (or ended); returns its seconds a step, when it can tell.
    Only a metrics.jsonl modified after `since` (this start's launch) counts: until the start rewrites it, the
    file still holds what the killed one logged."""
    path, first = out / "metrics.jsonl", None
    while proc.poll() is None:
        if path.is_file() and path.stat().st_mtime > since:
            step = logged_steps(out)
            first = first or (step, time.monotonic())
            if step >= target:
                return (time.monotonic() - first[1]) / (step - first[0]) if step > first[0] else None
        time.sleep(0.005)
    return None


def checkpoint_step(out: Path, a) -> tuple[int, str | None]:
    """The step of OUTPUT/checkpoint.pt (0 if none yet), or why it is unusable: after a kill it must be a
    whole checkpoint of a save point, never a half-written one."""
    path = out / "checkpoint.pt"
    if not path.is_file():
        return 0, None
    try:
        step = torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception as e:
        return 0, f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    if step % a.save_every and step != a.steps:
        return step, f"{path} is at step {step}, not a save point"
    return step, None


def per_step(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@contextmanager
def killed_on_exit(proc):
    """Kill `proc` (SIGKILL) if it still runs when the block ends: also when this script fails or is interrupted,
    no training is left running."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value

    return parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--cycles", type=count(0), default=30, help="kills before the run is let finish")
    p.add_argument("--steps", type=count(1), default=40)
    p.add_argument("--save-every", type=count(1), default=4)
    p.add_argument("--batch-size", type=count(1), default=4)
    p.add_argument("--max-seq-length", type=count(1), default=128)
    p.add_argument("--seed", type=int, default=0, help="training seed, and the kill delays' seed")
    a = p.parse_args()
    try:  # the windows train_cmd asks for
        check_window_params(a.max_seq_length, a.max_seq_length // 2, 32)
    except ValueError:
        sys.exit(f"soak_resume: --max-seq-length {a.max_seq_length}: too short for its windows (a doc stride of half "
                 "of it, questions up to 32 tokens); 128, say")  # fmt: skip
    work = Path(a.workdir)
    for flag, path in (("--model", a.model), ("--train-file", a.train_file)):
        if not Path(path).exists():
            sys.exit(f"soak_resume: {flag} {path}: no such file or folder")
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        sys.exit(f"soak_resume: {work} is not an empty folder; pass a new --workdir")
    rng = random.Random(a.seed)

    # The reference run, timed: start-up (until it starts training), one step, and the end (final save, plots).
    t0 = time.monotonic()
    ref = work / "reference"
    with folder_for(work):  # the folders made for the workdir go again (emptied) when the reference run fails
        (work / "logs").mkdir()
        with open(work / "logs" / "reference.log", "w") as log:
            proc = subprocess.Popen(train_cmd(a, ref, False), stdout=log, stderr=subprocess.STDOUT)
            with killed_on_exit(proc):
                wait_until_training(proc, Path(log.name))
                startup_s = time.monotonic() - t0
                proc.wait()
        if proc.returncode != 0:  # bertqa's own one-line error is the log's last line
            lines = Path(log.name).read_text(errors="replace").strip().splitlines() or ["(no output)"]
            for inner in work.iterdir():
                shutil.rmtree(inner)
            sys.exit(f"soak_resume: the reference run failed: {lines[-1]}")
    loop_s = json.loads((ref / "summary.json").read_text())["e2e_train_time"]
    ref_step_s = loop_s / a.steps
    end_s = max(0.0, time.monotonic() - t0 - startup_s - loop_s)

    out = work / "interrupted"
    starts = kills = mid_write = most_lost = 0
    logged_at_kill, failures = None, []
    while True:
        starts += 1
        log_path = work / "logs" / f"start-{starts:03d}.log"
        at, bad = checkpoint_step(out, a)
        if bad:
            failures.append(f"before start {starts}: {bad}")
            break
        with open(log_path, "w") as log:
            since = time.time()
            proc = subprocess.Popen(train_cmd(a, out, True), stdout=log, stderr=subprocess.STDOUT)
            with killed_on_exit(proc):
                if kills < a.cycles and rng.random() < 0.25:
                    delay = rng.uniform(0, startup_s)  # while loading
                elif kills < a.cycles:
                    # Once this start has logged a random step of the next three checkpoints' worth, a random part
                    # of a step later (in that step, or the checkpoint write after it) or, after the last step,
                    # in the final save. Counted in steps: under load, step times vary too much to aim in seconds.
                    target = rng.randint(min(at + 1, a.steps), min(a.steps, at + 3 * a.save_every))
                    step_s = wait_for_step(proc, out, since, target) or ref_step_s
                    delay = rng.uniform(0, end_s if target == a.steps else step_s)
                else:
                    delay = None
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    pass
        text = log_path.read_text()
        # How far the previous kill set the run back: what it had logged minus where this start picked up.
        m = re.search(r"resumed from .* at step (\d+)", text)
        resumed = int(m.group(1)) if m else (0 if "starting from the beginning" in text else None)
        if resumed is not None and logged_at_kill is not None:
            most_lost = max(most_lost, logged_at_kill - resumed)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            logged_at_kill = logged_steps(out)
            mid_write += any(out.glob(".checkpoint.*.tmp.pt"))
            continue
        if proc.returncode != 0:
            failures.append(f"start {starts} exited with {proc.returncode}, see {log_path}")
        break

    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []
    if leftovers:
        failures.append(f"temporary files left in {out}: {', '.join(leftovers)}")
    a_w = load_file(str(ref / "model" / "model.safetensors"))
    b_w = load_file(str(out / "model" / "model.safetensors")) if (out / "model").is_dir() else {}
    weights_match = a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    metrics_match = (out / "metrics.jsonl").is_file() and per_step(ref) == per_step(out)
    print(f"cycles run: {starts} ({kills} killed, {mid_write} of them mid checkpoint write; the last ran to the end)")
    print(f"most steps lost in a kill: {most_lost} (--save-every {a.save_every})")
    print(f"final weights bit-exact: {weights_match}; per-step losses and learning rates equal: {metrics_match}")
    for f in failures:
        print(f"FAILED: {f}")
    ok = weights_match and metrics_match and not failures and most_lost <= a.save_every
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:  # (a --workdir that cannot be made, say)
        sys.exit(f"soak_resume: error: {f'{e.filename}: {e.strerror}' if getattr(e, 'filename', None) else e}")
