"""Load on `bertqa serve`: N concurrent clients on loopback for a fixed time, batched against
`--max-batch-size 1`, both in the same run.

Each run starts its own server on a free loopback port; every client keeps one connection and posts SQuAD
dev questions (HF's Inference API form) one after another. Reported: requests/s, p50 / p99 latency, errors
(must be 0) and the mean batch the server ran (from its /metrics).

    python benchmarks/bench_serve.py --model runs/all-MiniLM-L6-v2 --random-head [--clients 16] [--seconds 20]

`--random-head`: the model is a pretrained encoder with no QA head (which the server refuses); a copy with a
fresh, seeded head is served instead. Speed does not depend on the head's values. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import cpu_threads, positive, run, seconds

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "squad-v1.1" / "dev-a.json"
DEFAULT_MODEL = ROOT / "runs" / "all-MiniLM-L6-v2"


def with_random_head(encoder: Path, out: Path, seed: int) -> Path:
    import torch

    from bertqa.checkpoint import load_model, save_pretrained
    from bertqa.tokenizer import load_tokenizer

    torch.manual_seed(seed)  # the fresh head is drawn from torch's generator
    return save_pretrained(load_model(encoder, verbose=False), load_tokenizer(encoder), out)


def squad_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, context) of every question in the SQuAD file, refused in one line where it is not SQuAD or
    holds no question (before any server starts)."""
    from bertqa.squad.data import load_json, parse_squad

    examples = parse_squad(load_json(path), path, is_training=False, require_answers=False)  # as predict reads it
    pairs = [(ex.question, ex.context) for ex in examples]
    if not pairs:
        raise ValueError(f"{path}: no question to ask")
    return pairs


def server_command(model: Path, **options) -> list[str]:
    args = [sys.executable, "-m", "bertqa", "serve", "--model", str(model), "--port", "0"]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 60.0):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def start_server(command: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # torch's intra-op threads
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            found = re.search(r" on (http://[\d.]+:\d+) \(", proc.stdout.readline())
            if found:
                url = found.group(1)
                while time.monotonic() < deadline and proc.poll() is None:  # loaded and warmed up
                    try:
                        if request(url, "GET", "/readyz", timeout=5)[0] == 200:
                            return proc, url
                    except OSError:
                        pass
                    time.sleep(0.2)
    if proc.poll() is not None:  # its own error line is already on stderr
        raise SystemExit(f"bench_serve: the server exited with status {proc.returncode} before it was ready: "
                         f"{' '.join(command)}")  # fmt: skip
    proc.kill()
    proc.wait()
    raise SystemExit(f"bench_serve: the server did not become ready in 120 s: {' '.join(command)}")


def batch_totals(url: str) -> tuple[float, float]:
    """(questions, model calls) so far, from the batch-size histogram."""
    text = request(url, "GET", "/metrics")[1]
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("bertqa_batch_size_"))
    return float(values["bertqa_batch_size_sum"]), float(values["bertqa_batch_size_count"])


def nearest_rank(sorted_values: list[float], q: float) -> float:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)] if sorted_values else float("nan")


def load(url: str, pairs: list[tuple[str, str]], clients: int, seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_gate = threading.Barrier(clients + 1)
    deadline = 0.0

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        k = i
        start_gate.wait()
        while True:
            question, context = pairs[k % len(pairs)]
            k += clients  # clients take turns through the questions, none twice in a row
            body = json.dumps({"inputs": {"question": question, "context": context}}).encode()
            sent = time.perf_counter()
            try:
                conn.request("POST", "/", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                ok = response.status == 200 and "answer" in json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            done = time.perf_counter()
            if done > deadline:  # in flight at the end: not counted either way
                break
            if ok:
                latencies[i].append(done - sent)
            else:
                errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    questions_before, calls_before = batch_totals(url)
    begin = time.perf_counter()
    deadline = begin + seconds
    start_gate.wait()
    for t in threads:
        t.join()
    questions_after, calls_after = batch_totals(url)
    all_latencies = sorted(x for per_client in latencies for x in per_client)
    calls = calls_after - calls_before
    return {
        "requests": len(all_latencies),
        "requests_per_s": len(all_latencies) / seconds,
        "p50_ms": 1000 * nearest_rank(all_latencies, 0.50),
        "p99_ms": 1000 * nearest_rank(all_latencies, 0.99),
        "errors": sum(errors),
        "mean_batch": (questions_after - questions_before) / calls if calls else float("nan"),
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fine-tuned model folder to serve")
    parser.add_argument("--random-head", action="store_true", help="serve a copy with a fresh seeded QA head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD file the questions come from")
    parser.add_argument("--clients", type=positive, default=16)
    parser.add_argument("--seconds", type=seconds, default=20.0, help="load time of each run")
    parser.add_argument("--max-batch-size", type=positive, default=16, help="of the batched run")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--threads", type=cpu_threads, help="the server's torch threads (OMP_NUM_THREADS; default: torch's)"
    )
    args = parser.parse_args()

    import torch

    pairs = squad_pairs(args.data)
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model = with_random_head(args.model, Path(tmp) / "model", args.seed) if args.random_head else args.model
        print(f"CPU: {cpu_model()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"server torch threads {args.threads or torch.get_num_threads()}; {args.clients} clients, {args.seconds:g} s per run, "
              f"precision {args.precision}, {len(pairs)} questions from {args.data.name}", flush=True)  # fmt: skip
        results = {}
        for label, batch in (("batched", args.max_batch_size), ("max batch 1", 1)):
            command = server_command(
                model, max_batch_size=batch, max_wait_ms=args.max_wait_ms, precision=args.precision
            )
            proc, url = start_server(command, args.threads)
            try:
                results[label] = load(url, pairs, args.clients, args.seconds)
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"{label}: {json.dumps(results[label])}", flush=True)

    print()
    print(f"| server (max wait {args.max_wait_ms:g} ms) | requests/s | p50 ms | p99 ms | errors | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, batch in (("batched", args.max_batch_size), ("max batch 1", 1)):
        r = results[label]
        print(f"| `--max-batch-size {batch}` | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['mean_batch']:.2f} |")  # fmt: skip
    summary = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "clients": args.clients,
        "seconds": args.seconds,
        "precision": args.precision,
        "threads": args.threads or torch.get_num_threads(),
        "model": str(args.model) + (" (random QA head)" if args.random_head else ""),
        "results": results,
        "speedup": results["batched"]["requests_per_s"] / max(results["max batch 1"]["requests_per_s"], 1e-9),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(json.dumps(summary))
    if any(r["errors"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
