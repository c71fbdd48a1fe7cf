"""Fine-tuning and evaluation on SQuAD: one device, or many through torchrun (DDP).

The recipe is NVIDIA DeepLearningExamples' `run_squad.py` (itself Google's): AdamW, weight decay 0.01 except
bias and LayerNorm, linear warmup then linear decay to 0, global grad-norm clip 1.0, loss = mean of the start
and end cross-entropies. Throughput counts features processed over the wall time of the loop, as they do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import stat
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .batching import epoch_batches, to_batch
from .checkpoint import damaged_record, save_pretrained
from .config import ATTENTION_DROPOUT, plain_copy
from .distributed import Dist, all_gather_objects, checked, distributed, fail_together
from .evaluate import (
    EvalConfig,
    finish,
    load_examples_and_features,
    load_tokenizer_and_model,
    run_evaluation,
    startup_line,
)
from .files import (
    NoBar,
    _even_read_only,
    atomic_path,
    bar_options,
    exclusive,
    file_id,
    first_line,
    fsync_path,
    holds_current_folder,
    named,
    note,
    open_to_append,
    remove_output,
    remove_tree,
    set_mode,
    soft_limit,
    utf8_name,
)
from .runtime import Precision, check_compiler, own_rng, rng_state, set_rng_state, synchronize

CHECKPOINT = "checkpoint.pt"  # resumable state, in the output folder

log = logging.getLogger("bertqa")


@dataclass(kw_only=True)
class TrainConfig(EvalConfig):
    predict_file: str | None = None  # evaluate at the end when given
    train_file: str  # SQuAD JSON to fine-tune on
    max_train_examples: int | None = None  # use only the first N questions (demos, smoke tests)
    epochs: float = 2.0  # NVIDIA recipe: 2 epochs
    max_steps: int | None = None  # overrides epochs when set
    train_batch_size: int = 8  # per device and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-5
    warmup: float = 0.1  # proportion of steps with linear warm-up
    weight_decay: float = 0.01  # not on bias / LayerNorm
    max_grad_norm: float = 1.0  # global norm clip; 0 = off
    attention_dropout: bool = ATTENTION_DROPOUT  # the config's attention-probability dropout, or none
    group_by_length: bool = True  # batch windows of similar length (less padding); False = plain shuffle
    seed: int = 42
    save_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    resume: bool = False  # continue from OUTPUT/checkpoint.pt
    log_every: int = 10  # steps between metrics.jsonl lines
    tensorboard: bool = False  # also log scalars to OUTPUT/tensorboard
    compile: bool = False  # torch.compile the training forward (symbolic shapes: few graphs for all batches)
    max_nonfinite_steps: int = 20  # stop after this many updates in a row skipped for a non-finite loss/gradient
    deterministic: bool = False  # deterministic kernels only (for GPUs; the CPU path is deterministic already)

    FLAGS = {"train_batch_size": "--batch-size", "batch_size": "--eval-batch-size"}
    POSITIVE = EvalConfig.POSITIVE + ("train_batch_size", "grad_accum", "log_every", "max_steps", "max_train_examples")
    WRITES = (CHECKPOINT, "metrics.jsonl", "curves.png", "model/", *EvalConfig.WRITES)  # model/: replaced whole

    def check_values(self) -> None:
        super().check_values()
        if self.train_file is None:  # ("" is a file name: check_files names it)
            raise ValueError("--train-file is required")
        for name in ("epochs", "lr", "warmup", "weight_decay", "max_grad_norm"):  # nan passes every comparison
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.epochs > 0:  # also with --max-steps, which then sets the length: a negative count is a typo
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"--warmup must be a fraction of the steps in [0, 1], got {self.warmup}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0, got {self.save_every}")
        if not 0 <= self.seed < 2**63:  # numpy refuses a negative seed; torch takes seed + rank below 2^64
            raise ValueError(f"--seed must be an integer in 0..2^63-1, got {self.seed}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--max-nonfinite-steps must be a positive integer, got {self.max_nonfinite_steps}")

    def check_files(self) -> None:
        super().check_files()
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package (pip install 'bertqa[tensorboard]')")
        board = Path(self.output_dir) / "tensorboard"
        if self.tensorboard and (board.exists() or board.is_symlink()) and not board.is_dir():
            what = "a file" if board.exists() else "a symbolic link to nothing"
            raise ValueError(f"--output-dir {self.output_dir}: {board}, where --tensorboard writes, is {what}")
        if self.tensorboard and not utf8_name(board):  # (TensorBoard encodes the names it is given as UTF-8)
            raise ValueError(f"--output-dir {self.output_dir}: TensorBoard cannot write in a folder whose path is not "
                             "UTF-8; name another folder, or leave out --tensorboard")  # fmt: skip
        ckpt = Path(self.output_dir) / "checkpoint.pt"
        # A link to nothing (a disk not mounted) is not "no checkpoint": --resume would start over, writing onto the
        # mount point.
        if ckpt.is_symlink() and not ckpt.exists():
            raise ValueError(f"--output-dir {self.output_dir}: {ckpt} is a symbolic link to nothing "
                             f"({os.readlink(ckpt)}); restore what it leads to, or remove the link")  # fmt: skip


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to 1 over warmup_steps, then linear decay to 0 at total_steps (NVIDIA's
    `warmup_linear` and HF's `get_linear_schedule_with_warmup` alike)."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def schedule_steps(epochs: float, steps_per_epoch: int, max_steps: int | None, warmup: float,
                   exact: bool = True) -> tuple[int, int]:  # fmt: skip
    """(total, warm-up) optimizer steps: `max_steps`, else `epochs` worth of them rounded up, and the `warmup`
    fraction of those rounded down. The products are rounded to 6 decimals first: in binary floating point
    1.1 x 100 is 110.00000000000001 and 0.29 x 100 is 28.999999999999996, which would train a step more than
    1.1 epochs hold, or warm up for a step less. `exact=False`: the products as they are, as runs took them
    until checkpoints recorded "warmup_steps" (a resume of such a checkpoint goes on with that schedule)."""
    fix = (lambda x: round(x, 6)) if exact else (lambda x: x)
    if not max_steps and not math.isfinite(epochs * steps_per_epoch):
        raise ValueError(f"--epochs {epochs}: too many steps ({epochs} x {steps_per_epoch} steps an epoch)")
    total = max_steps or max(1, math.ceil(fix(epochs * steps_per_epoch)))  # (a tiny --epochs: one step, not none)
    return total, int(fix(warmup * total))


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel for all parameters (CUDA, CPU since torch 2.4, some other accelerators); where the
    # device has none, torch's default (foreach) path.
    fused = device.type in ("cuda", "xpu", "mps", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, fused=fused or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, step: int, schedule: tuple[int, int],
                    cfg: TrainConfig, d: Dist, final_loss: float | None, skipped: tuple[int, int], resolved: dict,
                    since_log: tuple[torch.Tensor, torch.Tensor], train_seconds: float | None,
                    run_id: str, metrics_sha256: str | None = None) -> None:  # fmt: skip
    """Everything needed to continue exactly: weights, optimizer, schedule (total and warm-up steps), scaler,
    step (of the total: a run that stopped short is told from a finished one, see refuse_to_replace), every
    rank's RNG and loss summed since the last metrics line (`since_log`: the sum and the number of finite
    steps), what the run resolved its defaults to (`resolved`, see check_resumable), the seconds it has
    trained so far, the run's id (its model/run_config.json holds it too: see refuse_to_replace) and the digest of
    its metrics.jsonl's lines so far (a resume keeps them only if they are still those: see MetricsLog).
    Written to a temporary file and renamed, so an interrupted save leaves the previous checkpoint intact."""
    per_rank = all_gather_objects(d, (rng_state(d.device), [float(t.item()) for t in since_log]))
    if not d.is_main:
        return
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "total_steps": schedule[0],
        "warmup_steps": schedule[1],
        "final_loss": final_loss,
        "skipped_steps": skipped,  # updates skipped for non-finite values: in all, and in a row now
        "rng": [rng for rng, _ in per_rank],
        "loss_since_log": [sums for _, sums in per_rank],  # so that the next metrics line is as if never stopped
        "world_size": d.world_size,
        "config": json.dumps(dataclasses.asdict(cfg)),
        "resolved": resolved,
        "train_seconds": train_seconds,  # so that a resumed run's summary times the whole run (None: not known)
        "run_id": run_id,
        "metrics_sha256": metrics_sha256,
    }
    with atomic_path(path, durable=True) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            # A failed write of torch's zip writer (inline_container.cc), a full disk most likely, which it words as
            # "PytorchStreamWriter failed writing file ..." or "unexpected pos 704 vs 598" (torch 2.13). Others (out
            # of memory copying a GPU's tensors) are not the file's.
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            detail = " ".join(str(e).split())[:200]
            limit = soft_limit("RLIMIT_FSIZE")
            why = (f"the file size limit, ulimit -f, is {limit:,} bytes;" if limit is not None
                   and tmp.stat().st_size >= limit else "is the disk full?")  # fmt: skip
            raise OSError(f"{path}: cannot write the checkpoint ({why} torch: {detail})") from None


# What decides the data order, the schedule and the model: a resumed run must agree on all of it.
RESUME_KEYS = ("model", "config", "train_file", "max_train_examples", "epochs", "max_steps", "train_batch_size",
               "grad_accum", "lr", "warmup", "weight_decay", "max_grad_norm", "seed", "group_by_length",
               "max_seq_length", "doc_stride", "max_query_length", "precision", "attention_dropout",
               "lower_case")  # fmt: skip


# The paths whose files a checkpoint compares by content (the digest named), where it records that digest: the
# same files named from another folder, or by another path, are the same run.
COMPARED_BY_CONTENT = {"model": "model_config", "config": "model_config", "train_file": "train_data"}


def config_digest(config) -> str:
    """A hash of the model settings training depends on (config.json's fields bertqa reads, not its extras)."""
    return hashlib.sha256(json.dumps(config.settings(), sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(path: Path, state: dict, cfg: TrainConfig, d: Dist, resolved: dict) -> None:
    """Refuse to resume a run whose RESUME_KEYS, model settings or training windows (their digests, where
    recorded) differ. Where the checkpoint records what its run resolved a default to ("auto" precision, the
    tokenizer's own lower-casing), the resolved values are compared: an explicit `--precision bf16` resumes an
    "auto" run that chose bf16, and an "auto" run resumed on a device where auto chooses otherwise is refused.
    Checkpoints without that record compare the values as given; those with the digests compare the model and
    train file by them, not by the paths as typed (COMPARED_BY_CONTENT). Two keys may differ where they decide
    nothing: `epochs` where both runs set `max_steps`, and `max_train_examples` where the windows' digest is the
    same."""
    typed_then = json.loads(state["config"])
    typed_now = {k: getattr(cfg, k) for k in RESUME_KEYS}
    recorded = state["resolved"] if isinstance(state.get("resolved"), dict) else {}
    saved = {**typed_then, **recorded}
    now = {**typed_now, **{k: v for k, v in resolved.items() if k in recorded}}
    keys = [k for k in RESUME_KEYS if COMPARED_BY_CONTENT.get(k) not in recorded]
    if saved.get("max_steps") and now["max_steps"]:
        keys.remove("epochs")  # (it decides nothing where --max-steps is set)
    if saved.get("train_data") and saved.get("train_data") == resolved.get("train_data"):
        keys.remove("max_train_examples")  # the same windows: --max-train-examples past the file's questions too

    def shown(typed, value) -> str:  # what was given (None: nothing), and what a default ("auto", ...) came to
        given = "the default" if typed is None else repr(typed)
        return given if typed == value else f"{given} (= {value!r})"

    diff = [f"{cfg.flag(k)} {shown(typed_then.get(k), saved.get(k))} -> {shown(typed_now[k], now[k])}"
            for k in keys if saved.get(k) != now[k]]  # fmt: skip
    if "model_config" in recorded and saved["model_config"] != now["model_config"]:
        diff.append("another model: its config.json (or --config) holds other settings")
    # The windows follow from the settings too: their digest (older checkpoints have none) tells only the rest.
    saved_data, now_data = saved.get("train_data"), resolved.get("train_data")
    if not diff and saved_data and now_data and saved_data != now_data:
        diff.append("other training windows: the train file's contents or bertqa's featurisation changed")
    if state["world_size"] != d.world_size:
        diff.append(f"world size {state['world_size']} -> {d.world_size}")
    if diff:
        raise ValueError(f"{path}: cannot resume a different run ({'; '.join(diff)}); use another --output-dir")


# What save_checkpoint writes ("final_loss" came later and may be absent), and how to get past a bad file.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "rng", "world_size", "config")
BAD_CHECKPOINT = "move it away to start over, or use another --output-dir"


def load_checkpoint(path: Path, cfg: TrainConfig, d: Dist, schedule: tuple[int, int], resolved: dict,
                    older_schedule: tuple[int, int]) -> dict:  # fmt: skip
    """OUTPUT/checkpoint.pt, read and checked before any of it is used. A damaged or foreign file is an error
    of one line that leaves it in place: never resumed from, never silently replaced by a fresh start. Its
    `"schedule"` entry is the (total, warm-up) steps to go on with: `schedule`, or `older_schedule` for a
    checkpoint saved before they were recorded (schedule_steps' exact=False)."""
    if (damaged := damaged_record(path)) is not None:
        raise ValueError(f"{path}: damaged ({damaged} fails its checksum); {BAD_CHECKPOINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch's own messages run to paragraphs and suggest weights_only=False
        raise ValueError(f"{path}: truncated or not a checkpoint ({type(e).__name__}); {BAD_CHECKPOINT}") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{path}: not a bertqa training checkpoint (no {', '.join(missing)}); {BAD_CHECKPOINT}")
    try:
        config_ok = isinstance(json.loads(state["config"]), dict)
    except (TypeError, ValueError):
        config_ok = False
    ws = state["world_size"]
    if not config_ok or not (isinstance(ws, int) and isinstance(state["rng"], list) and len(state["rng"]) == ws):
        raise ValueError(f"{path}: damaged checkpoint (bad config, world_size or rng); {BAD_CHECKPOINT}")
    check_resumable(path, state, cfg, d, resolved)
    state["schedule"] = schedule if "warmup_steps" in state else older_schedule
    total_steps = state["schedule"][0]
    if state.get("total_steps", total_steps) != total_steps:  # the same settings over a train file since changed
        why = f"{state['total_steps']} steps -> {total_steps}: the training data differ"
        raise ValueError(f"{path}: cannot resume a different run ({why}); use another --output-dir")
    step = state["step"]
    if type(step) is not int or not 0 <= step <= total_steps:
        why = f"step {step!r}, not an integer in 0..{total_steps}"
        raise ValueError(f"{path}: damaged checkpoint ({why}); {BAD_CHECKPOINT}")
    # Added later than the keys above: absent from older checkpoints, checked where present.
    skipped = state.get("skipped_steps", (0, 0))
    since_log = state.get("loss_since_log", [(0.0, 0.0)] * ws)
    if not (_numbers(skipped, 2, int) and isinstance(since_log, list) and len(since_log) == ws
            and all(_numbers(x, 2, float) for x in since_log)):  # fmt: skip
        raise ValueError(f"{path}: damaged checkpoint (bad skipped_steps or loss_since_log); {BAD_CHECKPOINT}")
    if not isinstance(state.get("metrics_sha256"), (str, type(None))):
        raise ValueError(f"{path}: damaged checkpoint (bad metrics_sha256); {BAD_CHECKPOINT}")
    return state


def refuse_to_replace(path: Path, cfg: TrainConfig, d: Dist, total_steps: int | None = None,
                      resolved: dict | None = None) -> str | None:  # fmt: skip
    """A run started afresh (no --resume) writes its own checkpoint over OUTPUT/checkpoint.pt at its first save:
    refuse where that file may hold a run that stopped short, whose steps would be lost. A finished run's
    checkpoint (the demo's rerun into the same folder) is replaced as before. Read memory-mapped where it can
    be: the step, not gigabytes of weights. Without `total_steps` and `resolved` (not known yet) a checkpoint
    from before totals were recorded is let through, to be judged when they are. Returns the run id the
    checkpoint records (None where it records none)."""
    unknown = f"{path}: a checkpoint is here, and how far its run got cannot be told"
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file of torch's legacy format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        step, total = state["step"], state.get("total_steps")
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{unknown} ({type(e).__name__}); {BAD_CHECKPOINT}") from None
    if total is None:  # written before checkpoints recorded their total: this run's, if it is the same run
        if total_steps is None:
            return None
        try:
            check_resumable(path, state, cfg, d, resolved)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{unknown} (another run's, from an older bertqa); {BAD_CHECKPOINT}") from None
        total = total_steps
    if type(step) is not int or type(total) is not int:
        raise ValueError(f"{unknown} (step {step!r:.20} of {total!r:.20}); {BAD_CHECKPOINT}")
    if step < total:
        raise ValueError(f"{path}: a run that stopped at step {step} of {total} is here; --resume continues it, "
                         "or move it away (or use another --output-dir) to start over")  # fmt: skip
    # Finished, but stopped (a full disk, a kill) before its model, written after the checkpoint, was saved: the
    # checkpoint holds the only copy of the trained weights. The model/ saved after it names its run (checkpoints
    # record the id since 2026-12-05; before, only a model/ with no weights tells).
    model = path.parent / "model"
    if (_model_run_id(model) != state["run_id"] if state.get("run_id") is not None
            else not (model / "model.safetensors").is_file()):  # fmt: skip
        raise ValueError(f"{path}: the run here finished but its model/ was not saved; --resume saves it, or move "
                         "the checkpoint away (or use another --output-dir) to start over")  # fmt: skip
    return state.get("run_id")


def _model_run_id(folder: Path) -> str | None:
    """The run id in a model folder's run_config.json (None where there is none)."""
    try:
        return json.loads((folder / "run_config.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _numbers(x, n: int, kind: type) -> bool:
    """Whether x is a list or tuple of n non-negative numbers of `kind` (floats may be ints)."""
    ok = (int, float) if kind is float else (int,)
    return isinstance(x, (list, tuple)) and len(x) == n and all(type(v) in ok and v >= 0 for v in x)


class NonFiniteError(ValueError):
    """Too many consecutive steps with a non-finite loss or gradients (the message is one line)."""


def all_finite(d: Dist, *values):
    """Device booleans, one per value: finite on every rank (the ranks must agree on skipping an update).
    One all-reduce for all of them."""
    ok = torch.stack([torch.isfinite(v) for v in values]).to(torch.int32)
    if d.enabled:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return ok.bool().unbind()


class MetricsLog:
    """metrics.jsonl (+ TensorBoard scalars) on rank 0: on a resume, the lines up to `resume_step`, which the
    resumed run goes on from; else none of an earlier run's.

    A fresh run into a folder whose checkpoint or model/ is an earlier (finished) run's (`keep_earlier`) sets that run's
    metrics.jsonl and tensorboard folder aside, as `.metrics.jsonl.before-RUN_ID` and `.tensorboard.before-RUN_ID`
    (this run's id; `.NAME.none-RUN_ID` where there was none), until its own first checkpoint replaces the earlier
    one (`checkpointed`): a run that fails before then puts them back, and one killed outright has them put back at
    the next start into the folder (`checkpoint_run_id` is not its id), so that the folder's checkpoint and its
    curves always go together, as a --resume needs them."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int = 0, run_id: str = "",
                 checkpoint_run_id: str | None = None, keep_earlier: bool = False,
                 resume_sha256: str | None = None):  # fmt: skip
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.file = None
        self.earlier = {}  # {what a fresh run writes anew: where the earlier run's is set aside}
        real = Path(os.path.realpath(self.path))  # (a link's target is what is written, and is set aside beside it)
        board = out_dir / "tensorboard"
        for written in (real, board):
            _settle_set_aside(written, checkpoint_run_id)
        # On resume keep the lines up to the checkpoint; steps logged after it are redone.
        kept = []
        if resume_step and self.path.is_file():
            for raw in self.path.read_bytes().splitlines():
                try:
                    line = raw.decode("utf-8")
                    if json.loads(line)["step"] > resume_step:
                        break
                except (ValueError, KeyError, TypeError):  # (UnicodeDecodeError is a ValueError)
                    break  # a line cut short by a crash: the steps from there on are redone anyway
                kept.append(line)
        kept_text = "".join(line + "\n" for line in kept)
        self.sha256 = hashlib.sha256(kept_text.encode())
        if resume_step and not self.path.is_file():  # (deleted, or moved away as the refusal below says)
            if resume_sha256 not in (None, self.sha256.hexdigest()):
                log.warning("no %s: its lines up to step %d are gone; it goes on from there", self.path, resume_step)
        elif resume_sha256 is not None and self.sha256.hexdigest() != resume_sha256:
            # (a checkpoint.pt copied in from another run's folder: the curves would be two runs' joined at its step)
            raise ValueError(f"{self.path}: its lines up to step {resume_step} are not those the checkpoint was saved "
                             "with (another run's, or edited); move it away to resume")  # fmt: skip
        mode = stat.S_IMODE(real.stat().st_mode) if keep_earlier and real.is_file() else None
        if keep_earlier:
            # The checkpoint as it is now: a failure once this run's own has replaced it (its folder's fsync failing
            # after the rename, say) keeps this run's curves, as the next start after a kill at that point would.
            self.checkpoint, self.checkpoint_id = out_dir / CHECKPOINT, file_id(out_dir / CHECKPOINT)
            # TensorBoard's folder (this run's --tensorboard or not) only where it is one of its own: a link, a folder
            # holding other files or the current folder is the user's, not to be moved or removed (a fresh run then
            # hides its events, the purge step below). Where there is none, an empty `.NAME.none-RUN_ID` stands for
            # it: this run's go when it fails. (metrics.jsonl's is its link's target: a link to no file is none.)
            lines_none = not (real.exists() or real.is_symlink()) and real.parent.is_dir()
            board_none = not (board.exists() or board.is_symlink())
            plan = [(real, lines_none)] if real.is_file() or lines_none else []
            if (tensorboard and board_none) or (_events_only(board) and not holds_current_folder(board)):
                plan.append((board, board_none))
            for written, none in plan:
                aside = written.with_name(f".{written.name}.{'none' if none else 'before'}-{run_id}")
                try:
                    if none:
                        aside.touch(exist_ok=False)
                    else:
                        os.replace(written, aside)
                except OSError as e:
                    self._put_back()
                    raise named(e, written) from e
                self.earlier[written] = aside
        # (an earlier run's, set aside, is not: it is put back in its place)
        self.board, board_made = board, not (board.exists() or board.is_symlink()) and board not in self.earlier
        try:
            if tensorboard:  # first: a folder it cannot make stops the run before metrics.jsonl is rewritten
                from torch.utils.tensorboard import SummaryWriter

                _quiet_tensorboard_threads()
                # TensorBoard drops the events at or past the purge step that earlier files of the folder hold: on
                # a resume the steps after the checkpoint (redone), on a fresh run everything (an earlier run's).
                self.tb = self._on_board(SummaryWriter, str(board), purge_step=resume_step + 1 if resume_step else 0)
            # Written back whole before appending: a kill must not find the file emptied and lose the kept lines.
            with atomic_path(self.path) as tmp:
                tmp.write_text(kept_text, encoding="utf-8", newline="\n")
            # Unbuffered: each line is one write, so a line the disk refuses is not kept to fail again at close.
            self.file = open_to_append(self.path)
            if mode is not None:  # the mode of the file it stands in for (as atomic_path keeps a replaced file's),
                set_mode(real, mode)  # once open: a read-only one is still appended to
        except BaseException:
            self.close(failed=True)
            self._put_back()  # (a full disk, a file it may not write): the earlier curves stay the folder's
            if board_made and _events_only(board):  # (SummaryWriter makes the folder, and a file, before it fails)
                remove_tree(board)
            raise

    def log(self, record: dict) -> None:
        try:
            text = (json.dumps(record) + "\n").encode()
            line = memoryview(text)
            while line:  # a disk filling up mid-line takes part of it: the rest then fails, naming the disk's error
                line = line[self.file.write(line) :]
        except OSError as e:
            raise named(e, self.path) from e
        self.sha256.update(text)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:  # None: no finite loss since the last line
                    self._on_board(self.tb.add_scalar, f"train/{k}", v, record["step"])

    def sync(self) -> None:
        """To disk, before a checkpoint that resumes past these lines (a power loss must not lose them)."""
        fsync_path(self.path)  # its data, whichever descriptor asks; an error names the file

    def _on_board(self, call, *args, **kwargs):
        """call(...) on TensorBoard's writer, whose thread's error (a full disk) it raises here naming no file:
        named, the folder."""
        try:
            return call(*args, **kwargs)
        except OSError as e:
            # (or names its events file as bytes)
            raise (named(e, self.board) if e.strerror and not isinstance(e.filename, str) else e) from e

    def close_tb(self) -> None:
        tb, self.tb = self.tb, None
        try:
            if tb is not None:
                self._on_board(tb.close)
        finally:  # (also where the writer could not be made: the hook went in first)
            _unquiet_tensorboard_threads()

    def close(self, failed: bool = False) -> None:
        """Both closed; where the run has `failed` already, TensorBoard's error (often that same one, a full disk,
        raised again by its writer) is not raised over the run's own."""
        if self.file is not None:
            self.file.close()
        with contextlib.suppress(OSError) if failed else contextlib.nullcontext():
            self.close_tb()

    def checkpointed(self) -> None:
        """This run's checkpoint is saved: an earlier run's curves set aside are no longer the folder's."""
        for aside in self.earlier.values():
            _remove_path(aside)
        self.earlier = {}

    def _put_back(self) -> None:
        """The earlier run's curves back in their place (this run's, which stand there, go)."""
        for written, aside in self.earlier.items():
            _put_in_place(aside, written)
        self.earlier = {}

    def close_on_exit(self, kind, error, traceback) -> None:
        """close(), as the run's exit callback; a failed run that logged no line leaves no empty file (nor so the
        folders made for the run, which are removed again when empty); one that failed before its first
        checkpoint puts back the earlier run's lines it set aside."""
        self.close(failed=kind is not None)
        if kind is None:
            return
        if self.earlier:
            # (else at the next start into the folder; the run's own error stands)
            with contextlib.suppress(OSError, ValueError):
                # The checkpoint is another file now: this run's, whose curves are the folder's.
                if file_id(self.checkpoint) != self.checkpoint_id:
                    self.checkpointed()
                else:
                    self._put_back()
        elif self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()


def _remove_path(path: Path) -> None:
    """Remove a folder (not a link to one) whole, or a file (read-only ones too, which Windows keeps)."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path, ignore_errors=False)
    else:
        _even_read_only(lambda: path.unlink(missing_ok=True), path)


def _put_in_place(aside: Path, written: Path) -> None:
    """What was set aside back in its place (an empty `.NAME.none-RUN_ID`: that there was none), instead of what
    this run wrote there, which goes: TensorBoard's events only, never a folder holding anything else."""
    none = aside.name.startswith(f".{written.name}.none-")
    if written.is_dir() and not written.is_symlink():
        if not _events_only(written) or holds_current_folder(written):
            todo = (f"remove the killed run's events.out.tfevents.* from it, and {aside}" if none else
                    f"the earlier run's set aside are in {aside}: put them back by hand")  # fmt: skip
            raise ValueError(f"{written}: holds more than a run's TensorBoard events, or the current folder; {todo}")
        remove_tree(written, ignore_errors=False)
    if none:
        if written.is_file():
            _remove_path(written)
        _remove_path(aside)
    else:
        _even_read_only(lambda: os.replace(aside, written), written)


def _earlier_summary(out_dir: Path) -> dict:
    """OUTPUT/summary.json as an earlier run wrote it; {} where there is none that reads as one."""
    try:
        earlier = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def _quiet_tensorboard_threads() -> None:
    """An OSError of TensorBoard's writer thread is raised again by its writer's next call, in the thread that
    logs, which says it in one line (MetricsLog._on_board): not printed by the thread as a traceback too."""
    hook = threading.excepthook
    if getattr(hook, "quiets_tensorboard", False):
        return

    def quiet(args) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            hook(args)

    quiet.quiets_tensorboard, quiet.before = True, hook
    threading.excepthook = quiet


def _unquiet_tensorboard_threads() -> None:
    """The hook _quiet_tensorboard_threads replaced, back in place once no TensorBoard writer thread is left to
    raise (a library caller's process keeps its own hook); left where another has replaced it since."""
    hook = threading.excepthook
    if getattr(hook, "quiets_tensorboard", False) and not any(
        type(t).__name__ == "_AsyncWriterThread" and t.is_alive() for t in threading.enumerate()
    ):
        threading.excepthook = hook.before


def _events_only(folder: Path) -> bool:
    """A folder (not a link) holding TensorBoard's event files and nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(p.is_file() and p.name.startswith("events.out.tfevents.") for p in folder.iterdir())


def _settle_set_aside(written: Path, checkpoint_run_id: str | None) -> None:
    """What a fresh run killed outright left set aside for `written` (see MetricsLog): gone where the folder's
    checkpoint is that run's, else put back in place of what that run wrote."""
    names = os.listdir(written.parent) if written.parent.is_dir() else []
    for name in names:
        run = next((name[len(p) :] for p in (f".{written.name}.before-", f".{written.name}.none-") if name.startswith(p)),
                   None)  # fmt: skip
        if run is None:
            continue
        try:
            if run == checkpoint_run_id:  # that run's checkpoint was saved: its curves stand
                _remove_path(written.parent / name)
            else:  # killed before its first checkpoint: the folder's curves are these
                _put_in_place(written.parent / name, written)
        except OSError as e:
            raise named(e, written.parent / name) from e


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """Loss and learning-rate curves from metrics.jsonl, when matplotlib is installed (else none)."""
    try:
        import matplotlib  # noqa: F401 (first: a submodule imported already would not say it is gone)
        from matplotlib.figure import Figure  # (not pyplot: its backend and figures are the caller's, in a notebook)
    except ImportError as e:  # (not installed; or installed, and failing: a library that cannot be mapped, say)
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").partition(".")[0] == "matplotlib"
        why = "matplotlib is not installed (pip install 'bertqa[plot]')" if missing else f"matplotlib: {first_line(e)}"
        log.info("no curves.png: %s", why)
        return
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = [math.nan if r["loss"] is None else r["loss"] for r in rows]  # None: no finite loss since the last line
    fig = Figure(figsize=(10, 3.5))
    ax1, ax2 = fig.subplots(1, 2, sharex=True)
    # Markers: a lone point (one line logged, or a finite loss between two non-finite ones) is no line at all.
    ax1.plot(steps, losses, marker="o", markersize=3)
    if all(math.isnan(x) for x in losses):
        ax1.text(0.5, 0.5, "no finite loss logged", transform=ax1.transAxes, ha="center", va="center")
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", marker="o", markersize=3)
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Fine-tune, save OUTPUT/model, evaluate when cfg.predict_file is set; returns the summary.

    `on_step(step, loss)` is called after every optimizer step (and after its checkpoint, if any); `loss` is
    this rank's loss of the step as a device tensor (reading it syncs the device)."""
    cfg.check_values()  # (alike on every rank: at once)
    failure = checked(cfg.check_files)
    cfg = cfg if failure is not None else plain_copy(cfg)
    with deterministic_kernels(cfg.deterministic), distributed(cfg.device, failure=failure) as d, \
            contextlib.ExitStack() as held:  # fmt: skip
        held.enter_context(own_rng(d.device))  # the run seeds its own: a library caller's generators stay theirs
        if cfg.deterministic and cfg.attention == "auto" and d.device.type != "cpu":
            # Fused attention backward kernels on GPUs add in no set order (a CPU's are deterministic).
            cfg = dataclasses.replace(cfg, attention="eager")
        precision = Precision.resolve(cfg.precision, d.device)
        if cfg.compile:
            with fail_together(d):
                check_compiler(d.device)
        with precision.scope():
            return _train(cfg, d, precision, on_step, held)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """What a GPU run needs to repeat bit for bit: torch's deterministic algorithms (an error, not a silent
    nondeterministic kernel, where an op has none) and a fixed cuBLAS workspace (read when cuBLAS starts, so
    set before the first GPU matmul; left set). torch's setting is put back after."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _claim(out_dir: Path, held: contextlib.ExitStack) -> None:
    """Hold OUTPUT for this run (rank 0) and clear what a killed save left there."""
    # One run per output folder, until this one ends. A save cut short by a kill leaves its temporary file or folder
    # (a checkpoint's or a model's size), cleared now; the files themselves are only ever renamed into place whole,
    # so they hold the previous save.
    held.enter_context(exclusive(out_dir, clear=TrainConfig.WRITES))


def _train(cfg: TrainConfig, d: Dist, precision: Precision, on_step, held: contextlib.ExitStack) -> dict:
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT
    # A folder that is already there is claimed before the slow part (the model, the features), so that a
    # second run on it, or a fresh start over a run that stopped short, stops at once. Both are checked again
    # below, where this run's total of steps is known (a checkpoint from before totals were recorded is judged
    # only then) and the folder is claimed for certain.
    claimed = d.is_main and out_dir.is_dir()
    with fail_together(d):  # every rank joins it, whether it sees the file or not
        if claimed:
            _claim(out_dir, held)
        if not cfg.resume and ckpt_path.is_file():
            refuse_to_replace(ckpt_path, cfg, d)
    torch.manual_seed(cfg.seed)  # the same fresh QA head on every rank
    tokenizer, model = load_tokenizer_and_model(cfg, d, for_inference=False)
    model.set_attention_dropout(cfg.attention_dropout)
    _, _, features = load_examples_and_features(cfg.train_file, tokenizer, cfg, True, d, cfg.max_train_examples)
    # The evaluation file is read and checked now, not discovered to be broken after training.
    eval_data = load_examples_and_features(cfg.predict_file, tokenizer, cfg, False, d) if cfg.predict_file else None

    global_batch = cfg.train_batch_size * cfg.grad_accum * d.world_size
    steps_per_epoch = math.ceil(len(features) / global_batch)
    total_steps, warmup_steps = schedule_steps(cfg.epochs, steps_per_epoch, cfg.max_steps, cfg.warmup)
    # What a checkpoint saved before checkpoints recorded their schedule was trained with.
    older_schedule = schedule_steps(cfg.epochs, steps_per_epoch, cfg.max_steps, cfg.warmup, exact=False)
    optimizer = build_optimizer(model, cfg, d.device)
    # Reads the two names when called: a resume may set them to its checkpoint's schedule first.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(d.device.type) if precision.name == "fp16" else None

    start_step, final_loss, prior_seconds = 0, None, 0.0  # prior_seconds: trained before this start, if known
    resume_sha256 = None  # the digest of metrics.jsonl up to the checkpoint (None: an older bertqa recorded none)
    skipped, bad_run = 0, 0  # updates skipped for non-finite values: in all, and in a row now
    # The loss summed over the steps since the last metrics line, and how many of them had a finite loss.
    loss_sum = torch.zeros((), device=d.device)
    finite_since_log = torch.zeros((), device=d.device)
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks, as separate devices would
    # What "auto" and the tokenizer's default came to in this run: a resume compares these (check_resumable).
    # And which windows it trains on: a train file changed under the same name is another run.
    # And the model's settings (dropout, sizes): another folder's config under the same name is another run.
    resolved = {"precision": precision.name, "lower_case": tokenizer.do_lower_case, "train_data": features.digest(),
                "model_config": config_digest(model.config)}  # fmt: skip
    with fail_together(d):
        if d.is_main and not claimed:
            _claim(out_dir, held)
        checkpoint_run_id = None  # the run id of the checkpoint in the folder (a fresh run replaces it)
        if not cfg.resume and ckpt_path.is_file():  # again: another run may have written it in the meantime
            # (a checkpoint without a total is older than any with a recorded schedule)
            checkpoint_run_id = refuse_to_replace(ckpt_path, cfg, d, older_schedule[0], resolved)
    run_id = uuid.uuid4().hex  # a resumed run keeps its checkpoint's
    found = cfg.resume and ckpt_path.is_file()
    if cfg.resume and d.enabled and len(set(seen := all_gather_objects(d, found))) > 1:
        # Only rank 0 writes the checkpoint: on machines that do not share --output-dir, the others have none,
        # and ranks resuming from different steps would wait on each other's collectives until the timeout.
        have = ", ".join(str(r) for r, f in enumerate(seen) if f)
        raise ValueError(f"--resume: {ckpt_path} is there for rank {have} and not for the others; every rank "
                         "must see the same --output-dir (a folder shared by every machine)")  # fmt: skip
    if found:
        state = load_checkpoint(ckpt_path, cfg, d, (total_steps, warmup_steps), resolved, older_schedule)
        total_steps, warmup_steps = state["schedule"]
        final_loss, (skipped, bad_run) = state.get("final_loss"), state.get("skipped_steps", (0, 0))
        if "loss_since_log" in state:
            loss_sum.fill_(state["loss_since_log"][d.rank][0])
            finite_since_log.fill_(state["loss_since_log"][d.rank][1])
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"][d.rank], d.device)
        except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
            why = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict's list, on one line
            raise ValueError(f"{ckpt_path}: does not fit this model ({why}); {BAD_CHECKPOINT}") from None
        start_step, prior_seconds = state["step"], state.get("train_seconds")
        resume_sha256 = state.get("metrics_sha256")
        run_id = checkpoint_run_id = state.get("run_id") or run_id
        if d.is_main:
            note(f"bertqa: resumed from {ckpt_path} at step {start_step}")
    elif cfg.resume and d.is_main:
        note(f"bertqa: --resume: no {ckpt_path} yet, starting from the beginning")

    if d.is_main:
        note(startup_line(d, precision, cfg.attention, cfg.compile))
        note(
            f"bertqa: {len(features)} training features, {total_steps} steps of {global_batch} "
            f"({cfg.train_batch_size} per device x {cfg.grad_accum} accumulation x {d.world_size} ranks)"
        )
    # A finished run's curves stand beside its model/ even where its checkpoint was deleted: kept the same way.
    earlier_model = _model_run_id(out_dir / "model") is not None
    with fail_together(d):  # rank 0 writes; a failure there (a full disk) must not leave the others in DDP's set-up
        metrics = None
        if d.is_main:
            metrics = MetricsLog(out_dir, cfg.tensorboard, start_step, run_id, checkpoint_run_id,
                                 keep_earlier=not found and (ckpt_path.is_file() or earlier_model),
                                 resume_sha256=resume_sha256)  # fmt: skip
    if metrics is not None:
        held.push(metrics.close_on_exit)  # also when a step fails: TensorBoard's last scalars reach the disk
    # Compiled with symbolic batch and length, so length-grouped batches of every shape share a graph.
    # Evaluation and saving use the plain module, which shares the weights.
    fwd = torch.compile(model, dynamic=True) if cfg.compile else model
    ddp = DDP(fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.enabled else fwd

    model.train()
    options = bar_options()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, **options) \
        if cfg.progress and d.is_main else NoBar()  # fmt: skip
    held.callback(bar.close)
    saved_step = start_step or None  # the step of the checkpoint this run last wrote or resumed from

    def save(step: int, seconds: float | None) -> None:
        # Rank 0 writes (a full disk fails there) while the others would go on training. Two agreements: the
        # checkpoint's own gather of every rank's RNG state must not meet a rank that already failed.
        with fail_together(d):
            if metrics is not None:
                metrics.sync()  # the lines up to `step` reach the disk before the checkpoint that resumes past them
        with fail_together(d):
            save_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, (total_steps, warmup_steps), cfg,
                            d, final_loss, (skipped, bad_run), resolved, (loss_sum, finite_since_log), seconds,
                            run_id, None if metrics is None else metrics.sha256.hexdigest())  # fmt: skip
            if metrics is not None:
                metrics.checkpointed()

    batches, batches_epoch = None, -1
    t0 = time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            lengths = features.lengths if cfg.group_by_length else None
            batches = epoch_batches(len(features), global_batch, cfg.seed, epoch, lengths)
            batches_epoch = epoch
        # This step's rows: (grad_accum, world, per-device batch); this rank takes its column.
        rows = batches[i].reshape(cfg.grad_accum, d.world_size, cfg.train_batch_size)[:, d.rank]
        step_loss = torch.zeros((), device=d.device)
        for a in range(cfg.grad_accum):
            batch = to_batch(features, rows[a], d.device, with_labels=True)
            last = a == cfg.grad_accum - 1
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = ddp.no_sync() if d.enabled and not last else contextlib.nullcontext()
            with sync:
                with precision.autocast():
                    loss = ddp(**batch).loss / cfg.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach()
        if scaler is not None:
            scaler.unscale_(optimizer)
        # The norm is computed even without clipping (an infinite max norm scales by exactly 1): a non-finite
        # loss or gradient is caught at its step and the update skipped, so the weights stay as they were.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        loss_ok, grads_ok = all_finite(d, step_loss, grad_norm)
        if scaler is not None:
            # The scaler skips the update itself on non-finite gradients, and then lowers the scale: expected
            # while it calibrates, so counted in the log rather than reported one by one.
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            applied = scaler.get_scale() >= scale
        else:
            applied = bool(loss_ok & grads_ok)  # a host sync per step (idle of microseconds on an accelerator)
            if applied:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        if step == start_step:  # the one call torch checks (its first after the scheduler is made; a resume's is later)
            with warnings.catch_warnings():
                # The schedule counts steps, skipped ones too (as NVIDIA's): torch's warning that the first update
                # was skipped (by the scaler while it calibrates, on every rank) says nothing the log does not.
                warnings.filterwarnings(
                    "ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
                )
                scheduler.step()
        else:
            scheduler.step()
        done = step + 1
        if applied:
            bad_run = 0
        else:
            skipped, bad_run = skipped + 1, bad_run + 1
            if d.is_main and (scaler is None or not bool(loss_ok)):
                note(f"bertqa: step {done}: non-finite loss or gradients, update skipped ({bad_run} in a row)")
            if bad_run >= cfg.max_nonfinite_steps:
                retry = "to retry with a lower --lr" + {"fp16": ", or bf16 / fp32", "bf16": ", or fp32"}.get(
                    precision.name, ""
                )
                kept = (f"the last checkpoint, {ckpt_path} (step {saved_step}), is intact; --resume keeps a run's "
                        f"settings: {retry}, move it away or use another --output-dir" if saved_step
                        else f"no checkpoint was saved (see --save-every); {retry}, run again")  # fmt: skip
                raise NonFiniteError(f"stopped at step {done}: {bad_run} updates in a row skipped for a non-finite "
                                     f"loss or gradients; {kept}")  # fmt: skip
        loss_sum += torch.where(loss_ok, step_loss, 0.0)
        finite_since_log += loss_ok
        bar.update(1)
        if done % cfg.log_every == 0 or done == total_steps:
            # The loss averaged over the steps since the last line and over the ranks (a sync, as above).
            step_total = step_loss.clone()  # on_step gets this rank's loss, not the sum
            if d.enabled:
                torch.distributed.all_reduce(loss_sum)
                torch.distributed.all_reduce(step_total)
            finite = finite_since_log.item()
            avg = loss_sum.item() / finite / d.world_size if finite else None
            final_loss = step_total.item() / d.world_size if bool(loss_ok) else None
            loss_sum.zero_()
            finite_since_log.zero_()
            elapsed = time.perf_counter() - t0
            seq_s = (done - start_step) * global_batch / elapsed
            with fail_together(d):  # a full disk on rank 0 stops every rank, not only rank 0
                if d.is_main:
                    metrics.log({"step": done, "epoch": done / steps_per_epoch, "loss": avg, "lr": lr,
                                 "sequences_per_second": seq_s, "skipped_steps": skipped})  # fmt: skip
                    # (in a log file, shown at the bar's next draw, every 30 s: a draw at every line was noise)
                    bar.set_postfix(loss=f"{avg:.3f}" if avg is not None else "nan", lr=f"{lr:.2e}",
                                    refresh=not options)  # fmt: skip
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            save(done, None if prior_seconds is None else prior_seconds + time.perf_counter() - t0)
            saved_step = done
        if on_step is not None:
            on_step(done, step_loss)
    synchronize(d.device)
    train_time = time.perf_counter() - t0
    bar.close()
    if prior_seconds is None:  # resumed from a checkpoint that did not record its time: this part's alone
        trained = (total_steps - start_step) * global_batch
    else:  # the whole run's, across its resumes (a finished run resumed again trains nothing and keeps them)
        train_time, trained = prior_seconds + train_time, total_steps * global_batch
    save(total_steps, None if prior_seconds is None else train_time)
    summary = {"e2e_train_time": train_time,
               "training_sequences_per_second": trained / train_time if train_time > 0 else 0.0,
               "final_loss": final_loss, "train_features": len(features), "steps": total_steps,
               "world_size": d.world_size, "precision": precision.name, "skipped_steps": skipped}  # fmt: skip
    finished_before = False  # model/ held this run's final model already (a finished run, resumed again)
    with fail_together(d):  # rank 0 writes while the others go on to the evaluation's collectives
        if d.is_main:
            metrics.close()
            run_config = json.dumps({**dataclasses.asdict(cfg), "run_id": run_id}, indent=2) + "\n"
            finished_before = _model_run_id(out_dir / "model") == run_id

            def forget_earlier() -> None:
                """model/ holds this run's model now: an earlier run's predictions, summary and curves are not its,
                and must not be left beside it by an evaluation that fails (out of memory, non-finite logits) or not
                asked for, nor by a failure drawing the curves (nor, without matplotlib, by no curves drawn). Where
                it held it already (a finished run, resumed), they are this model's. A save that fails before the
                swap leaves the folder's model and results as they were."""
                if not finished_before:
                    for name in (*EvalConfig.WRITES, "curves.png"):
                        remove_output(out_dir / name)

            # Run once model/ holds this run's model, whatever fails after, and before a Ctrl-C or SIGTERM held
            # during the swap is delivered (SIGTERM's default ends the process at once, running no `finally:`).
            save_pretrained(model, tokenizer, out_dir / "model", extra_files={"run_config.json": run_config},
                            with_qa_head=True, replaced=forget_earlier)  # fmt: skip
            plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    if eval_data is not None:
        summary.update(run_evaluation(model, eval_data, cfg, d, precision, out_dir if d.is_main else None))
    else:  # the same weights as a finished run's: their evaluation, kept beside them, stays in the summary too
        earlier = _earlier_summary(out_dir) if finished_before else {}  # (rank 0's, for every rank: the same summary)
        summary = {**all_gather_objects(d, earlier)[0], **summary}
    if d.is_main:
        finish(summary, out_dir)
    return summary
