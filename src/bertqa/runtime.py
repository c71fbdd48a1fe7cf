"""Device and precision: which precision to run in (and why), as a scoped setting that restores what it
changed; device synchronisation and RNG state for any accelerator, CUDA or not.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import subprocess
from dataclasses import dataclass

import torch

from .config import PRECISIONS
from .files import first_line

log = logging.getLogger("bertqa")

# CPU features with real bf16 / fp16 matmul instructions. Without them oneDNN emulates the type, which ran
# over 100x slower than fp32 on an AVX2-only EPYC (0.9 vs 160 GFLOP/s); plain AVX-512 emulates it too.
CPU_NATIVE = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpu_features() -> dict | None:
    """The CPU's feature flags as torch's cpuinfo reports them (None where this torch cannot tell)."""
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        return None


# oneDNN's instruction-set levels (dnnl_cpu_isa_t: each a bit mask holding the ones below it), by the names its
# ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) takes, and the level each native instruction needs. Capped below that
# level, oneDNN emulates the type however able the CPU is.
ONEDNN_ISA = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F, "AVX512_CORE": 0x27,
              "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7, "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
              "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
              "AVX512_CORE_AMX_FP16": 0x1FEF}  # fmt: skip
ISA_NEEDED = {
    "avx512_bf16": ONEDNN_ISA["AVX512_CORE_BF16"],
    "amx_bf16": ONEDNN_ISA["AVX512_CORE_AMX"],
    "avx512_fp16": ONEDNN_ISA["AVX512_CORE_FP16"],
    "amx_fp16": ONEDNN_ISA["AVX512_CORE_AMX_FP16"],
}


def onednn_isa_cap() -> tuple[str, int] | None:
    """(variable=value, mask) of the instruction-set cap oneDNN reads from the environment, or None: unset, or a
    name it does not cap at (DEFAULT, ALL, a later level)."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # (oneDNN's order)
        value = os.environ.get(name, "")
        if value:
            mask = ONEDNN_ISA.get(value.upper())  # (oneDNN takes any case, but no spaces: " AVX2" caps nothing)
            return None if mask is None else (f"{name}={value}", mask)
    return None


def onednn_may_use(feature: str) -> bool:
    """Whether no instruction-set cap (onednn_isa_cap) keeps oneDNN from `feature`, a key of ISA_NEEDED."""
    cap = onednn_isa_cap()
    return cap is None or cap[1] & ISA_NEEDED[feature] == ISA_NEEDED[feature]


# ROCm GPUs with bf16 and fp16 matrix instructions, by the start of their architecture name (gcnArchName):
# MFMA on CDNA 1 to 4 (MI100 gfx908, MI200 gfx90a, MI300 gfx94x, MI350 gfx950), WMMA on RDNA 3 and 4 (gfx11xx,
# gfx12xx). Older ones (MI50/MI60 and Radeon VII gfx906, Vega gfx900, RDNA 2 gfx103x) have none: a ROCm
# "compute capability" is the architecture's number (9.0 for both MI50 and MI250), not NVIDIA's scale.
ROCM_MATRIX = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def native_precision(precision: str, device: torch.device, features: dict | None = None) -> tuple[bool | None, str]:
    """Whether `device` runs bf16/fp16 matmuls natively (None: this torch cannot tell), and the evidence, in
    words."""
    if device.type == "cuda" and not _nvidia(device):  # ROCm
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        native = arch.startswith(ROCM_MATRIX)
        return native, f"ROCm GPU {arch} {'has' if native else 'lacks'} {precision} matrix instructions"
    if device.type == "xpu":
        # Intel's matrix engines (XMX / DPAS: Data Center GPU Max, Arc) run bf16 and fp16; torch names them so.
        native = getattr(torch.xpu.get_device_properties(device), "has_subgroup_matrix_multiply_accumulate", False)
        return (
            native,
            f"XPU {'reports' if native else 'does not report'} matrix engines (subgroup matrix multiply-accumulate)",
        )
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # bf16 tensor cores arrived with Ampere (8.0); fp16 ones with Volta (7.0).
        native = major >= (8 if precision == "bf16" else 7)
        return native, f"CUDA compute capability {major}.{minor}"
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return False, f"oneDNN is {'off' if torch.backends.mkldnn.is_available() else 'not in this torch'}"
        features = cpu_features() if features is None else features
        if features is None:
            return None, "this torch cannot read the CPU's features (torch.cpu.get_capabilities)"
        have = [f for f in CPU_NATIVE[precision] if features.get(f)]
        if not have:
            return False, f"CPU lacks {' and '.join(CPU_NATIVE[precision])}"
        usable = [f for f in have if onednn_may_use(f)]
        if not usable:
            return (
                False,
                f"CPU has {'/'.join(have)}, but {onednn_isa_cap()[0]} keeps oneDNN from "
                f"{'them' if len(have) > 1 else 'it'}",
            )
        return True, f"CPU has {'/'.join(usable)}"
    return False, f"{device.type}: native {precision} support unknown"


def check_compiler(device: torch.device) -> None:
    """torch.compile builds a CPU's kernels in C++ at the first step (minutes in, past the loading and the data):
    without a working compiler, say so now, as the user's to fix (inductor's error read as bertqa's bug)."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # (a private module: another torch finds out at the first step, as before)
        return
    try:
        get_cpp_compiler()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # none found; a $CXX that cannot run (a folder)
        cxx = "unset: g++ is tried" if os.environ.get("CXX") is None else repr(os.environ["CXX"])
        raise ValueError(f"--compile: no working C++ compiler for torch.compile's CPU kernels ({first_line(e)}; "
                         f"$CXX {cxx}); install one (g++), name it in $CXX, or leave --compile out") from None  # fmt: skip


def _nvidia(device: torch.device) -> bool:
    """A CUDA device that is NVIDIA's (ROCm's GPUs are "cuda" too, with capabilities that mean other things)."""
    return device.type == "cuda" and not getattr(torch.version, "hip", None)


def _has_tf32(device: torch.device) -> bool:
    """TF32 tensor cores: NVIDIA compute capability 8.0 (Ampere) and later."""
    return _nvidia(device) and torch.cuda.get_device_capability(device)[0] >= 8


def _fp32_precisions() -> list:
    """(setting, value) of the per-operation float32 precision settings of torch 2.9 and later ([] before) that
    the legacy TF32 flags write: CUDA's matmul (allow_tf32, set_float32_matmul_precision), cuDNN's convolutions and
    RNNs (cudnn.allow_tf32), oneDNN's matmul (set_float32_matmul_precision). Only these: the backend-wide ones are
    not written by those flags, and torch 2.13's `torch.backends.mkldnn.fp32_precision` sets the global one."""
    b = torch.backends
    settings = [b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                getattr(b.mkldnn, "matmul", None)]  # fmt: skip
    return [(x, x.fp32_precision) for x in settings if x is not None and hasattr(x, "fp32_precision")]


def _readable(getter):
    """A legacy flag's value, or None where the newer settings were set in a way it cannot express (torch then
    raises "you have used mix of the legacy and new APIs")."""
    try:
        return getter()
    except RuntimeError:
        return None


@dataclass
class Precision:
    """A resolved precision: fp32, tf32 (TF32 matmuls), bf16 or fp16 (autocast; weights stay fp32)."""

    name: str
    device: torch.device
    reason: str = "asked for"

    @classmethod
    def resolve(cls, requested: str | None, device: torch.device, features: dict | None = None) -> Precision:
        """`auto` (or None): bf16 where the device has native bf16 matmuls, else TF32 on NVIDIA GPUs, else fp32.
        An explicit choice is kept, with a warning when it would be emulated."""
        device = torch.device(device)
        requested = requested or "auto"
        if requested not in PRECISIONS:
            raise ValueError(f"--precision {requested!r}: choose from {', '.join(PRECISIONS)}")
        if requested != "auto":
            # Other GPUs without matrix units (ROCm's are "cuda") still run fp16 at twice the fp32 rate: bf16 only.
            if (
                requested == "bf16"
                and device.type in ("cuda", "xpu")
                or requested == "fp16"
                and _nvidia(device)
                or (requested in ("bf16", "fp16") and device.type == "cpu")
            ):
                native, why = native_precision(requested, device, features)
                if not native:
                    slow = (
                        f"{'may' if native is None else 'will'} be emulated, far slower"
                        if device.type == "cpu"
                        else "has no tensor cores or matrix units here, likely slower"
                    )
                    log.warning("%s: %s %s than fp32", why, requested, slow)
            if requested == "tf32" and (device.type == "cpu" or _nvidia(device)) and not _has_tf32(device):
                log.warning("%s has no TF32 matmuls: tf32 computes as fp32 there", device)
            return cls(requested, device)
        native, why = native_precision("bf16", device, features)
        if native:
            return cls("bf16", device, f"auto: {why}, native bf16 matmuls")
        if _nvidia(device):
            tf32 = "TF32 matmuls" if _has_tf32(device) else "TF32 (fp32 matmuls: this GPU has no TF32)"
            return cls("tf32", device, f"auto: {why}, no bf16 tensor cores, {tf32}")
        return cls("fp32", device, f"auto: {why}, so no native bf16")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        """The context to run forward passes under: autocast to bf16 / fp16, or for fp32 / tf32 autocast off (a call
        made inside another's autocast, from a hook say, runs in its own precision all the same)."""
        if self.autocast_dtype is None:
            try:
                return torch.autocast(device_type=self.device.type, enabled=False)
            except RuntimeError:  # a device type torch has no autocast for: nothing to turn off
                return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def scope(self):
        """Set the float32 matmul precision this precision implies (TF32 or not) and put back what was there.
        It is set through torch's legacy flags, which keep the per-backend settings of the newer API
        (`torch.backends.*.fp32_precision`) in step; both are saved and restored, the newer ones last. Where a caller
        set the newer ones in a way a legacy flag cannot express, reading that flag raises: it is not saved then."""
        tf32 = self.name == "tf32"
        newer = _fp32_precisions()
        cuda = _readable(lambda: torch.backends.cuda.matmul.allow_tf32)
        cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
        matmul = _readable(torch.get_float32_matmul_precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            yield self
        finally:
            if cuda is not None:
                torch.backends.cuda.matmul.allow_tf32 = cuda
            if cudnn is not None:
                torch.backends.cudnn.allow_tf32 = cudnn
            if matmul is not None:
                torch.set_float32_matmul_precision(matmul)
            for setting, value in newer:  # last: each gets its own value back, whatever the legacy setters wrote
                setting.fp32_precision = value

    def describe(self) -> str:
        return self.name if self.reason == "asked for" else f"{self.name} ({self.reason})"


def _module(device: torch.device):
    """torch's module for an accelerator type (torch.cuda, torch.xpu, torch.mps, an out-of-tree backend's
    registered module such as torch.gcu), or None for the CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type, None)


def _on(device: torch.device, name: str):
    """The accelerator module's function `name`, bound to `device` itself where it takes a device (cuda:1 is
    not the current device unless something made it so), or None on the CPU or where the module lacks it."""
    fn = getattr(_module(device), name, None)
    if fn is None:
        return None
    try:
        takes_device = "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        takes_device = False
    return functools.partial(fn, device=device) if takes_device else fn  # torch.mps.synchronize takes none


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timing boundary); nothing to do on the CPU."""
    if (fn := _on(device, "synchronize")) is not None:
        fn()


def rng_state(device: torch.device) -> dict:
    """The CPU generator's state and the device's own, whatever the accelerator."""
    state = {"cpu": torch.get_rng_state()}
    if (fn := _on(device, "get_rng_state")) is not None:
        state[device.type] = fn()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type in state and (fn := _on(device, "set_rng_state")) is not None:
        fn(state[device.type])


@contextlib.contextmanager
def own_rng(device: torch.device):
    """The caller's random generators, the CPU's and `device`'s, as they were once the block ends or fails: what
    bertqa seeds and draws inside (train, bench, a model's initial weights) is not taken from a library user's."""
    saved = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(saved, device)
