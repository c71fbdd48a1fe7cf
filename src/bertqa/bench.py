"""`bertqa bench`: training or inference throughput of bertqa, side by side with HuggingFace transformers'
`BertForQuestionAnswering` on the same weights, windows and precision, in the same process.

Rows:
- bertqa: this package's model and batching (length-grouped batches for training, sorted for inference).
- hf-run_qa: transformers as `run_qa.py` runs it: every window padded to --seq-len, batches in data order
  (training: shuffled).
- hf-best: transformers at its best: the same length-grouped (training) or sorted (inference) batches as
  bertqa, each padded to its longest window, as Trainer's `group_by_length` does.

Each row builds its model and runs warm-up steps (not timed); then the rows take turns, one timed segment each,
--segments times, so that the machine's drift over the run slows every row alike instead of landing in the
ratios (the rows' models are all held at once meanwhile). A segment runs --steps batches (as many whole passes
over them as fill --seconds, if given); the figures are the medians over segments. MFU counts the FLOPs of
real (non-pad) tokens against the device's matmul peak in that precision, measured in the same run (before
the rows and after each round of segments: the fastest matmul of all). Peak memory is the most the process's
resident memory (CPU) or allocated device memory (accelerators) grew for the row: while it was built and
warmed up, or by what it kept after that plus the most any of its segments added.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .batching import epoch_batches, to_batch
from .files import note
from .runtime import Precision, check_compiler, own_rng, synchronize
from .squad.features import check_positive

# --- model FLOPs


def forward_flops(config, lengths: np.ndarray) -> float:
    """Matmul FLOPs of one forward pass over sequences of the given lengths (2 per multiply-add): the Q, K, V
    and output projections, Q K^T and P V, the feed-forward, and the span head."""
    C, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = float(np.sum(lengths))
    squares = float(np.sum(np.asarray(lengths, np.float64) ** 2))
    per_layer = 2 * tokens * (4 * C * C + 2 * C * I) + 2 * 2 * squares * C
    return L * per_layer + 2 * tokens * C * 2


def fastest(fn, seconds: float) -> float:
    """The shortest time one call of fn took, calling it again and again for about `seconds` (at least twice)."""
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best, calls = min(best, time.perf_counter() - t0), calls + 1
    return best


def matmul_peak(device: torch.device, precision: Precision, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul in the precision's compute dtype: the fastest of repeated calls, each
    timed alone. A peak is a best case, and the other tenants of a shared machine slow some calls: the average
    over one second once came out at half the usual figure, and that run's MFU at 114%."""
    dtype = precision.autocast_dtype or torch.float32

    def matmul(n: int):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def call():
            a @ b
            synchronize(device)

        call()  # kernel selection, first-touch of the output
        t0 = time.perf_counter()
        call()
        return call, time.perf_counter() - t0

    with precision.scope():
        n, call = sized_matmul(device, matmul)
        return 2 * n**3 / fastest(call, seconds)


def sized_matmul(device: torch.device, probe):
    """matmul_peak's matrix side and its matmul (`probe(n)`: the call, and the seconds one took after a first):
    8192 on GPUs; on a CPU 2048, or the first size from 256 up (doubling) whose call takes 50 ms or more. A
    precision the CPU emulates (fp16 without AVX-512 FP16 or AMX, bf16 without AVX-512 BF16) ran one 2048 x 2048
    matmul in 20 s or more, and the bench sat minutes in its peaks."""
    cpu = device.type == "cpu"
    n = 256 if cpu else 8192
    call, took = probe(n)
    while cpu and n < 2048 and took < 0.05:
        n *= 2
        call, took = probe(n)
    return n, call


# --- memory


def _rss() -> int | None:
    """Resident memory now, where the system says (Linux's /proc); else None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident pages
    except (OSError, ValueError, IndexError):
        return None


def _allocator(device: torch.device):
    """The module with memory_allocated / max_memory_allocated / reset_peak_memory_stats for an accelerator:
    torch.accelerator's device-generic ones (CUDA, XPU, MPS, ...) where torch has them, else torch.cuda's."""
    generic = getattr(torch, "accelerator", None)
    return generic if hasattr(generic, "max_memory_allocated") else torch.cuda


def memory_in_use(device: torch.device) -> int | None:
    """Resident memory (CPU) or allocated device memory now, once freed memory has been handed back: garbage
    collected, and the C heap's free pages returned to the OS, so that what a row allocates next shows as
    growth rather than reusing another row's high water. None where it cannot be read (a CPU without /proc)."""
    gc.collect()
    if device.type != "cpu":
        return _allocator(device).memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss()


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak resident memory (Linux 4.0+), if it lets us."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status", "rb") as f:  # (bytes: its Name: line is the program's, in no set encoding)
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(b"VmHWM:"))


class PeakMemory:
    """Peak growth (`grown`) of resident memory or of allocated device memory. On Linux the kernel keeps the peak
    of resident memory (reset on entry); where it does not let us reset it, a thread samples it every 2 ms.
    Sampling is the fallback only: on 2 cores its wake-ups cost the bertqa inference row 5-8% of its speed and
    hf-best nothing measurable. Where resident memory cannot be read at all, `grown` is None."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.base = memory_in_use(self.device)
        self._thread = None
        if self.device.type != "cpu":
            _allocator(self.device).reset_peak_memory_stats(self.device)
        elif self.base is not None and not _reset_peak_rss():
            self.peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type != "cpu":
            self.peak = _allocator(self.device).max_memory_allocated(self.device)
        elif self.base is None:
            self.peak = None
        elif self._thread is None:
            self.peak = _peak_rss()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.grown = None if self.peak is None else self.peak - self.base


# --- windows


@dataclass
class Windows:
    input_ids: np.ndarray  # (N, L)
    token_type_ids: np.ndarray
    lengths: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray

    @property
    def max_seq_length(self) -> int:
        return self.input_ids.shape[1]


def random_windows(n: int, seq_len: int, vocab: int, seed: int = 0) -> Windows:
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab - 1), vocab, (n, seq_len)).astype(np.int32)  # past the special tokens
    types = np.zeros((n, seq_len), np.int8)
    types[:, seq_len // 4 :] = 1
    starts = rng.integers(seq_len // 4, seq_len - 8, n).astype(np.int32)
    return Windows(ids, types, np.full(n, seq_len, np.int32), starts, starts + 3)


def data_windows(path, tokenizer, seq_len: int, doc_stride: int = 128, max_query_length: int = 64,
                 mode: str = "train") -> Windows:  # fmt: skip
    """The windows of a SQuAD file: as training reads it (labelled questions; answers realigned, or the question
    skipped), or for inference as predict reads it (every question, answers or not)."""
    from .squad.data import load_json, parse_squad
    from .squad.features import featurize

    train = mode == "train"
    examples = parse_squad(load_json(path), path, is_training=train, require_answers=train)
    if not examples:
        raise ValueError(f"--data {path}: no usable {'training ' if train else ''}questions")
    f = featurize(examples, tokenizer, seq_len, min(doc_stride, seq_len - max_query_length - 3), max_query_length,
                  is_training=train)  # fmt: skip
    return Windows(f.input_ids, f.token_type_ids, f.lengths, f.start_positions, f.end_positions)


# --- rows


def hf_model(config, state_dict, attention: str = "sdpa", attention_dropout: bool = True):
    """transformers' BertForQuestionAnswering of a bertqa config, holding the weights of a bertqa state dict
    (without `attention_dropout`, its attention dropout probability set to 0). Built from the settings bertqa's
    model reads alone: config.json's other entries, which bertqa ignores, would change what transformers runs
    ("return_dict": false returns tuples, "gradient_checkpointing" recomputes, "output_attentions" keeps more)."""
    import transformers

    cfg = transformers.BertConfig(**config.settings())
    if not attention_dropout:
        cfg.attention_probs_dropout_prob = 0.0
    cfg._attn_implementation = attention
    hf = transformers.BertForQuestionAnswering(cfg)
    missing, unexpected = hf.load_state_dict(state_dict, strict=False)
    if unexpected or any("position_ids" not in k and "token_type_ids" not in k for k in missing):
        raise RuntimeError(f"weights do not map onto transformers' BERT: missing {missing}, unexpected {unexpected}")
    return hf


def _batches(windows: Windows, mode: str, batch_size: int, grouped: bool, steps: int, pad_to: int | None = None,
             seed: int = 0):  # fmt: skip
    """Row indices of `steps` batches that stand for the whole set: one epoch of batches as the mode makes them
    (training: shuffled, length-grouped if `grouped`, the last one topped up as training does; inference: cut in
    order, sorted by length if `grouped`, the last one short as predict's is),
    sorted by the length they are padded to (their longest window, or `pad_to`), then by their real tokens (all
    that orders batches padded to one length), and cut into `steps` equal strata, of which each gives its middle
    batch; in a seeded random order. A few batches drawn at random can be much shorter or longer than the set
    (6 training batches averaged 142 tokens against the set's 162), and the speed-ups differ with the length."""
    n = len(windows.lengths)
    if mode == "train":
        batches = list(epoch_batches(n, batch_size, seed, 0, windows.lengths if grouped else None))
    else:
        order = np.argsort(windows.lengths, kind="stable") if grouped else np.arange(n)
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    padded = [pad_to or windows.lengths[b].max() for b in batches]
    real = [windows.lengths[b].sum() for b in batches]
    by_length = np.lexsort((real, padded))
    chosen = by_length[((np.arange(steps) + 0.5) * len(batches) / steps).astype(int)]
    return [batches[i] for i in np.random.default_rng(seed).permutation(chosen)]


class Row:
    """One configuration of a bench. `start` builds its model (`make()`) and runs the warm-up; each `segment` then
    times the same `steps` batches (the warm-up runs the first `warmup` of them), as many whole passes over them
    as fill `seconds` (one pass without), so that segments differ by the machine's noise alone, not by their mix of
    lengths. Rows on the same windows and batching run the same batches (bertqa and hf-best), and the bench
    interleaves the rows' segments, so that the machine's drift over the run lands on every row alike rather than
    in the ratios. With `pad_to`, every batch is padded to that many tokens (run_qa.py's pad_to_max_length), its
    attention mask still covering the real tokens alone. `result` gives the medians over segments of windows/s,
    real (unpadded) tokens/s and FLOP/s (`flops(lengths)`: the useful FLOPs of windows of those real lengths),
    and the row's peak memory: the most it grew while the row was built and warmed up, or what it kept after that
    plus the most any of its segments added to it, whichever is more (None where it cannot be read)."""

    def __init__(self, make, windows: Windows, mode: str, batch_size: int, grouped: bool, precision: Precision,
                 device, warmup: int, steps: int, flops, seconds: float | None = None, lr: float = 5e-5,
                 pad_to: int | None = None):  # fmt: skip
        self.make, self.windows, self.mode, self.pad_to = make, windows, mode, pad_to
        self.precision, self.device, self.warmup, self.seconds, self.lr = precision, device, warmup, seconds, lr
        self.timed = _batches(windows, mode, batch_size, grouped, steps, pad_to)
        # What one pass over the timed batches holds: every segment's rates are these over its seconds a pass.
        self.pass_windows = sum(len(i) for i in self.timed)
        self.pass_tokens = sum(int(windows.lengths[i].sum()) for i in self.timed)
        self.pass_flops = sum(flops(windows.lengths[i]) for i in self.timed)
        self.passes_per_s = []  # one entry a segment
        self.model = self.optimizer = None

    def _step(self, idx):
        batch = to_batch(self.windows, idx, self.device, with_labels=self.mode == "train", pad_to=self.pad_to)
        if self.mode == "train":
            with self.precision.autocast():
                out = self.model(**batch)
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:  # as predict_logits runs it (and transformers' pipelines), for every row alike
            with torch.inference_mode(), self.precision.autocast():
                self.model(**batch)

    def start(self) -> Row:
        with PeakMemory(self.device) as mem:
            self.model = self.make()
            self.model.train(self.mode == "train")
            if self.mode == "train":
                try:
                    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, fused=True)
                except (RuntimeError, TypeError):
                    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
            with self.precision.scope():
                for i in range(self.warmup):
                    self._step(self.timed[i % len(self.timed)])
                synchronize(self.device)
        self.peak_memory = mem.grown
        self.resident = None if mem.grown is None else memory_in_use(self.device) - mem.base
        return self

    def segment(self) -> float:
        """Time one segment; returns its windows/s."""
        passes = 0
        with PeakMemory(self.device) as mem, self.precision.scope():
            t0 = time.perf_counter()
            while True:
                for idx in self.timed:
                    self._step(idx)
                synchronize(self.device)
                passes += 1
                elapsed = time.perf_counter() - t0
                if self.seconds is None or elapsed >= self.seconds:
                    break
        if mem.grown is not None:
            self.peak_memory = max(self.peak_memory, self.resident + mem.grown)
        self.passes_per_s.append(passes / elapsed)
        return self.pass_windows * self.passes_per_s[-1]

    def result(self) -> dict:
        """The figures (the median of the segments' rates: with an even number of segments, the mean of the middle
        two), after which the row lets go of its model."""
        self.model = self.optimizer = None
        rate = statistics.median(self.passes_per_s)
        return {"windows_per_s": self.pass_windows * rate, "tokens_per_s": self.pass_tokens * rate,
                "flops_per_s": self.pass_flops * rate, "segments": [self.pass_windows * r for r in self.passes_per_s],
                "peak_memory_mb": self.peak_memory_mb}  # fmt: skip

    @property
    def peak_memory_mb(self) -> float | None:
        return None if self.peak_memory is None else self.peak_memory / 2**20


def cpu_name() -> str:
    try:
        out = subprocess.run(
            ["lscpu"],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env={**os.environ, "LC_ALL": "C"},
            timeout=10,
        ).stdout  # (C: its field names untranslated)
    except (OSError, subprocess.SubprocessError):
        out = ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or "unknown")  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_name()} ({torch.get_num_threads()} threads, PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()})"
    return str(device)


@dataclass(kw_only=True)
class BenchConfig:
    model: str | None = None  # checkpoint to load (anything load_model reads)
    config: str | None = None  # config.json (or a preset name) for --model weights without one beside them
    trust_pickle: bool = False  # allow full unpickling of a --model checkpoint that holds more than tensors
    preset: str | None = None  # or a randomly initialised base / large BERT
    mode: str = "train"  # train | infer
    data: str | None = None  # SQuAD JSON for real windows (default: random full-length windows)
    tokenizer: str | None = None  # for --data with --preset (default: the model's)
    batch_size: int = 32
    seq_len: int = 384
    precision: str = "auto"
    steps: int = 10  # timed steps per segment: the batches every segment runs
    seconds: float | None = None  # or more: whole passes over those batches until a segment has run this long
    segments: int = 3
    warmup: int = 3  # untimed steps first
    compile: bool = False
    device: str | None = None
    compare: str | None = None  # "hf": also time transformers, as run_qa.py runs it and at its best
    attention_dropout: bool | None = None  # None: the training default (bertqa.train)
    hf_attention_dropout: bool | None = None  # None: the HF rows train with the config's, as transformers does


def _check(cfg: BenchConfig) -> None:
    for flag, path in (("--model", cfg.model), ("--data", cfg.data), ("--tokenizer", cfg.tokenizer),
                       ("--config", cfg.config)):  # fmt: skip
        if path is not None and not str(path):  # Path("") would be the current folder
            raise ValueError(f"{flag} '': empty; name the file or folder, or leave the flag out")
    if (cfg.model is None) == (cfg.preset is None):
        raise ValueError("give exactly one of --model or --preset")
    if cfg.preset is not None and (cfg.config is not None or cfg.trust_pickle):
        raise ValueError("--config and --trust-pickle are for --model weights, not --preset")
    if cfg.preset is not None and cfg.preset not in ("base", "large"):
        raise ValueError(f"--preset {cfg.preset!r}: choose base or large")
    if cfg.mode not in ("train", "infer"):
        raise ValueError(f"--mode {cfg.mode!r}: choose train or infer")
    check_positive(**{f"--{name.replace('_', '-')}": getattr(cfg, name) for name in ("batch_size", "seq_len", "steps",
                                                                                      "segments")})  # fmt: skip
    if cfg.batch_size >= 2**31:  # (numpy's limits spoke for it: "Maximum allowed dimension exceeded")
        raise ValueError(f"--batch-size {cfg.batch_size}: must be below 2^31")
    seconds = cfg.seconds
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds < float("inf")):  # fmt: skip
        raise ValueError(f"--seconds must be a positive number, got {seconds!r}")
    if isinstance(cfg.warmup, bool) or not isinstance(cfg.warmup, int) or cfg.warmup < 0:
        raise ValueError(f"--warmup must be an integer >= 0, got {cfg.warmup}")
    if not 16 <= cfg.seq_len <= 512:
        raise ValueError(f"--seq-len {cfg.seq_len}: must be between 16 and 512")
    if cfg.data and cfg.seq_len < 96:  # room for a 64-token question, 3 special tokens and some context
        raise ValueError(f"--seq-len {cfg.seq_len}: with --data it must be at least 96")
    given = {"attention-dropout": cfg.attention_dropout, "hf-attention-dropout": cfg.hf_attention_dropout}
    for name, on in given.items():
        if on not in (None, True, False):  # ("no" would read as on)
            raise ValueError(f"{name.replace('-', '_')} must be True, False or None, got {on!r}")
    dropout = [f"--{'' if on else 'no-'}{name}" for name, on in given.items() if on is not None]
    if cfg.mode == "infer" and dropout:
        raise ValueError(f"{dropout[0]} is for --mode train: inference runs no dropout")
    if cfg.hf_attention_dropout is not None and cfg.compare != "hf":
        raise ValueError(f"{dropout[-1]} is for --compare hf's rows")
    if cfg.compare not in (None, "hf"):
        raise ValueError(f"--compare {cfg.compare!r}: only hf is supported")
    from pathlib import Path

    for flag, path in (("--model", cfg.model), ("--data", cfg.data), ("--tokenizer", cfg.tokenizer)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if cfg.data and cfg.preset and not cfg.tokenizer:
        raise ValueError("--data with --preset needs --tokenizer (vocab.txt or tokenizer.json)")
    if cfg.tokenizer and not cfg.data:
        raise ValueError("--tokenizer is for --data's windows (random windows need none)")


def bench(cfg: BenchConfig) -> dict:
    """Builds and times the rows; prints the table, the ratios and the JSON line, and returns that result. Seeded
    (the same windows, initial weights and dropout each run), from generators of its own (runtime.own_rng)."""
    from .config import plain_copy
    from .distributed import resolve_device

    # Numpy numbers and paths as the command line gives them: checked as such, and the JSON line takes no other.
    cfg = plain_copy(cfg)
    _check(cfg)
    versions = {"torch": torch.__version__}  # the ratios move with either library's kernels
    if cfg.compare == "hf":
        try:
            import transformers
        except ImportError:
            raise ValueError("--compare hf needs transformers (pip install transformers)") from None
        versions["transformers"] = transformers.__version__
        transformers.BertForQuestionAnswering  # noqa: B018 (imported now, not inside the first HF row's memory)
    device = resolve_device(cfg.device)
    precision = Precision.resolve(cfg.precision, device)
    if cfg.compile:
        check_compiler(device)
    with own_rng(device):
        return _bench_rows(cfg, device, precision, versions)


def _bench_rows(cfg: BenchConfig, device: torch.device, precision: Precision, versions: dict) -> dict:
    from .checkpoint import load_model
    from .config import ATTENTION_DROPOUT, BertConfig, check_seq_len
    from .model import BertForQuestionAnswering

    torch.manual_seed(0)
    if cfg.model:
        model = load_model(cfg.model, config=cfg.config, trust_pickle=cfg.trust_pickle, verbose=False)
    else:
        model = BertForQuestionAnswering(BertConfig.preset(cfg.preset))
    check_seq_len(cfg.seq_len, model.config.max_position_embeddings, "--seq-len")
    if cfg.data:
        from .tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, config=model.config)
        except FileNotFoundError as e:
            if cfg.tokenizer is not None:
                raise
            raise FileNotFoundError(f"{e}; or pass --tokenizer") from None
        windows = data_windows(cfg.data, tokenizer, cfg.seq_len, mode=cfg.mode)
    else:
        windows = random_windows(max(cfg.batch_size * 64, 2048), cfg.seq_len, model.config.vocab_size)
    batches = -(-len(windows.lengths) // cfg.batch_size)
    if cfg.steps > batches:  # more would time some batches twice
        raise ValueError(f"--steps {cfg.steps}: the {len(windows.lengths)} windows make only {batches} "
                         f"batch{'es' * (batches > 1)} of {cfg.batch_size}; time at most that many")  # fmt: skip
    where = device_name(device)
    note(f"bertqa: bench {cfg.mode}, {cfg.model or cfg.preset} ({model.config.num_hidden_layers} layers, hidden "
         f"{model.config.hidden_size}), {len(windows.lengths)} windows of mean length {windows.lengths.mean():.0f}"
         f"/{cfg.seq_len}, batch {cfg.batch_size}, on {where}, precision {precision.describe()}; "
         + ", ".join(f"{k} {v}" for k, v in versions.items()))  # fmt: skip
    peak = matmul_peak(device, precision)
    timing = dict(precision=precision, device=device, steps=cfg.steps, seconds=cfg.seconds)

    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model

    dropout = {"bertqa": bool((ATTENTION_DROPOUT if cfg.attention_dropout is None else cfg.attention_dropout)
                              and config.attention_probs_dropout_prob > 0)}  # fmt: skip

    def ours():
        m = BertForQuestionAnswering(config).to(device)
        m.load_state_dict(state)
        if cfg.mode == "train":
            m.set_attention_dropout(dropout["bertqa"])
        return torch.compile(m, dynamic=True) if cfg.compile else m

    def hf():
        return hf_model(config, state, attention_dropout=dropout["hf"]).to(device)

    # Compiled, every timed batch runs once in the warm-up: a batch of new guards (no padding mask, another
    # attention path) would otherwise compile inside a timed segment. On a GPU every row's does, for every row's
    # first call at a new length builds kernels and plans (cuDNN's attention: 125-450 ms each, model.py), which
    # would land in the first segment. On a CPU a new length costs little: oneDNN's kernels, rebuilt in every
    # pass anyway with bertqa's 64-entry kernel caches (__init__.py).
    warm = max(cfg.warmup, cfg.steps) if device.type != "cpu" else cfg.warmup
    makers = {"bertqa": (ours, True, max(cfg.warmup, cfg.steps) if cfg.compile else warm, None)}
    if cfg.compare == "hf":
        dropout["hf"] = cfg.hf_attention_dropout is not False and config.attention_probs_dropout_prob > 0
        makers["hf-run_qa"] = (hf, False, warm, windows.max_seq_length)  # every window padded in full
        makers["hf-best"] = (hf, True, warm, None)
    factor = 3 if cfg.mode == "train" else 1  # the backward pass costs twice the forward

    def flops(lengths):
        return factor * forward_flops(config, lengths)

    # What a process pays once (lazy imports, thread pools, kernel caches: 13-25 MB on a CPU) lands in the first step
    # it runs: one untimed step of each kind of model first, then dropped, so that the first row is not charged it.
    for make in dict.fromkeys(make for make, *_ in makers.values()):
        Row(make, windows, cfg.mode, cfg.batch_size, True, warmup=1, flops=flops, **timing).start()
    rows = {name: Row(make, windows, cfg.mode, cfg.batch_size, grouped, warmup=warmup, flops=flops, pad_to=pad_to,
                      **timing)
            for name, (make, grouped, warmup, pad_to) in makers.items()}  # fmt: skip
    # Each row's peak memory is its own growth, above what the process held as it started: this, and the models
    # of the rows built before it.
    baseline = memory_in_use(device)
    baseline_mb = None if baseline is None else baseline / 2**20
    held = (f"resident (torch{', transformers' * (cfg.compare == 'hf')}, the windows, a copy of the weights)"
            if device.type == "cpu" else "allocated on the device")  # fmt: skip
    note(f"bertqa:   before the rows (after an untimed step of each kind of model): "
         f"{'unmeasured' if baseline is None else f'{baseline_mb:.0f} MB'} {held}; "
         "each row's peak memory is its own growth above what was held when it started")  # fmt: skip
    for name, row in rows.items():
        row.start()
        note(f"bertqa:   {name}: built and warmed up, {_mb(row.peak_memory_mb)}")
    for s in range(cfg.segments):  # round-robin: drift over the run slows every row alike
        rates = ", ".join(f"{name} {row.segment():.2f}" for name, row in rows.items())
        note(f"bertqa:   segment {s + 1}/{cfg.segments}: {rates} windows/s")
        peak = max(peak, matmul_peak(device, precision, seconds=0.5))  # the peak too, whenever the rows ran
    rows = {name: row.result() for name, row in rows.items()}
    for name, r in rows.items():
        r["mfu"] = r.pop("flops_per_s") / peak
        note(f"bertqa:   {name:10s} {r['windows_per_s']:8.2f} windows/s  {r['tokens_per_s']:9.0f} real tokens/s  "
             f"MFU {100 * r['mfu']:5.1f}%  peak memory {_mb(r['peak_memory_mb'])}  "
             f"(segments {', '.join(f'{x:.2f}' for x in r['segments'])})")  # fmt: skip
    result = {"mode": cfg.mode, "model": cfg.model or cfg.preset, "device": where,
              "precision": precision.name, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
              "mean_window_length": float(windows.lengths.mean()), "matmul_peak_tflops": peak / 1e12,
              "compile": cfg.compile, "versions": versions, "memory_baseline_mb": baseline_mb, "rows": rows}  # fmt: skip
    if cfg.mode == "train":  # which rows trained with attention dropout (the HF rows: as the config says, by default)
        result["attention_dropout"] = dropout
    by_segment_lines = []
    for base in ("hf-run_qa", "hf-best"):
        if base in rows:
            result[f"speedup_vs_{base}"] = rows["bertqa"]["windows_per_s"] / rows[base]["windows_per_s"]
            ours_mb, base_mb = rows["bertqa"]["peak_memory_mb"], rows[base]["peak_memory_mb"]
            result[f"memory_vs_{base}"] = None if ours_mb is None or base_mb is None else ours_mb / max(base_mb, 1e-9)
            # Round by round (the rows' segments of one round ran minutes apart at most): how far the ratio moved.
            by_segment = [round(a / b, 3) for a, b in zip(rows["bertqa"]["segments"], rows[base]["segments"])]
            result[f"speedup_vs_{base}_by_segment"] = by_segment
            by_segment_lines.append(
                f"bertqa: vs {base}, segment by segment: {', '.join(f'{x:.2f}x' for x in by_segment)}"
            )
    print(table(result), flush=True)
    for line in by_segment_lines:
        print(line, flush=True)
    print(json.dumps(result), flush=True)
    return result


def table(result: dict) -> str:
    lines = ["| row | windows/s | real tokens/s | MFU | peak memory (MB) | bertqa speed-up |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    ours = result["rows"]["bertqa"]["windows_per_s"]
    for name, r in result["rows"].items():
        mb = "unmeasured" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {r['windows_per_s']:.2f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                     f"{mb} | {ours / r['windows_per_s']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def _mb(megabytes: float | None) -> str:
    return "memory unmeasured" if megabytes is None else f"+{megabytes:.0f} MB"
