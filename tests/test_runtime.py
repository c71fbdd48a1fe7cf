"""Precision choice (auto on every kind of device, with the probes mocked), scoped settings, atomic writes."""

import errno
import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from skips import platform_skip

from bertqa.files import atomic_dir, atomic_path, remove_output, remove_stale_temps, write_json
from bertqa.runtime import Precision, rng_state, set_rng_state

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_onednn_cap():
    """The CPU's features are mocked here: a cap set in the caller's environment would change every choice (its own
    MonkeyPatch: a test's monkeypatch.undo() leaves this in place)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            patch.delenv(name, raising=False)
        yield


@pytest.mark.parametrize(
    "features, expected, why",
    [
        ({"avx512_bf16": True, "avx2": True}, "bf16", "avx512_bf16"),
        ({"amx_bf16": True}, "bf16", "amx_bf16"),
        ({"avx2": True, "avx512_f": True}, "fp32", "lacks avx512_bf16 and amx_bf16"),  # AVX-512 alone emulates bf16
        ({}, "fp32", "lacks"),
    ],
)
def test_auto_on_cpus(features, expected, why):
    p = Precision.resolve("auto", CPU, features=features)
    assert p.name == expected and why in p.reason and p.describe().startswith(f"{expected} (auto: ")
    assert Precision.resolve(None, CPU, features=features).name == expected  # None means auto


@pytest.mark.parametrize(
    "variable, value, expected, why",
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", "fp32", "CPU has avx512_bf16/amx_bf16, but ONEDNN_MAX_CPU_ISA=AVX2 keeps"),
        ("ONEDNN_MAX_CPU_ISA", "avx512_core", "fp32", "but ONEDNN_MAX_CPU_ISA=avx512_core keeps oneDNN from them"),
        ("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI", "fp32", "but DNNL_MAX_CPU_ISA=AVX512_CORE_VNNI keeps"),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", "bf16", "CPU has avx512_bf16, native"),  # AMX capped, not bf16
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", "bf16", "CPU has avx512_bf16/amx_bf16, native"),
        ("ONEDNN_MAX_CPU_ISA", "DEFAULT", "bf16", "CPU has avx512_bf16/amx_bf16, native"),
        ("ONEDNN_MAX_CPU_ISA", " AVX2", "bf16", "CPU has avx512_bf16/amx_bf16, native"),  # (oneDNN: no such name)
        ("ONEDNN_MAX_CPU_ISA", "", "bf16", "CPU has avx512_bf16/amx_bf16, native"),
    ],
)
def test_auto_on_cpus_follows_onednns_isa_cap(monkeypatch, caplog, variable, value, expected, why):
    """(review) oneDNN capped below AVX512_CORE_BF16 emulates bf16 (3-10x slower than fp32 here) whatever the CPU
    has: auto chose bf16 and said the matmuls were native."""
    monkeypatch.setenv(variable, value)
    p = Precision.resolve("auto", CPU, features={"avx512_bf16": True, "amx_bf16": True})
    assert p.name == expected and why in p.reason, p.reason
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        Precision.resolve("bf16", CPU, features={"avx512_bf16": True, "amx_bf16": True})
    assert ("bf16 will be emulated, far slower than fp32" in caplog.text) == (expected == "fp32")


def test_onednns_own_variable_wins_over_its_old_name(monkeypatch):
    """(mutation review) oneDNN reads ONEDNN_MAX_CPU_ISA first, DNNL_MAX_CPU_ISA only where that is unset."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")
    p = Precision.resolve("auto", CPU, features={"avx512_bf16": True})
    assert p.name == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2 keeps" in p.reason, p.reason


def test_auto_on_a_torch_that_cannot_read_the_cpus_features(monkeypatch, caplog):
    """(review) The start-up line said the CPU lacked bf16 instructions, which it may have."""
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    p = Precision.resolve("auto", CPU)
    assert p.name == "fp32" and p.reason == (
        "auto: this torch cannot read the CPU's features (torch.cpu.get_capabilities), so no native bf16"
    )
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        assert Precision.resolve("bf16", CPU).name == "bf16"
    assert "get_capabilities): bf16 may be emulated, far slower than fp32" in caplog.text


def test_auto_on_cpus_needs_onednn(monkeypatch):
    # Without oneDNN (switched off, or a build without it) torch's bf16 matmuls are emulated whatever the CPU has.
    bf16 = {"avx512_bf16": True, "amx_bf16": True}
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    p = Precision.resolve("auto", CPU, features=bf16)
    assert p.name == "fp32" and "oneDNN is off" in p.reason
    monkeypatch.undo()
    assert torch.backends.mkldnn.enabled and Precision.resolve("auto", CPU, features=bf16).name == "bf16"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    p = Precision.resolve("auto", CPU, features=bf16)
    assert p.name == "fp32" and "oneDNN is not in this torch" in p.reason


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "tf32")])
def test_auto_on_cuda(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = Precision.resolve("auto", torch.device("cuda", 0))
    assert p.name == expected and f"compute capability {capability[0]}.{capability[1]}" in p.reason


@pytest.mark.parametrize("arch, expected", [
    ("gfx942:sramecc+:xnack-", "bf16"),  # MI300X
    ("gfx90a:sramecc+:xnack-", "bf16"),  # MI250X
    ("gfx1100", "bf16"),  # RX 7900 XTX
    ("gfx906:sramecc+:xnack-", "fp32"),  # MI50: capability 9.0 as MI250's, and no bf16 matrix instructions
    ("gfx1030", "fp32"),  # RX 6800
])  # fmt: skip
def test_auto_on_rocm_reads_the_architecture_not_the_capability(monkeypatch, arch, expected):
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(gcnArchName=arch))
    p = Precision.resolve("auto", torch.device("cuda", 0))
    assert p.name == expected and f"ROCm GPU {arch.split(':')[0]} " in p.reason  # fp32, not a TF32 it does not know


@pytest.mark.parametrize("engines, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_xpu_follows_its_matrix_engines(monkeypatch, engines, expected):
    props = SimpleNamespace(has_subgroup_matrix_multiply_accumulate=engines, has_bfloat16_conversions=True)
    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda device=None: props)
    p = Precision.resolve("auto", torch.device("xpu", 0))
    assert p.name == expected and f"XPU {'reports' if engines else 'does not report'} matrix engines" in p.reason


def test_choices_a_cuda_gpu_would_emulate_are_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # Turing
    gpu = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        assert Precision.resolve("bf16", gpu).name == "bf16"
    assert (
        "compute capability 7.5: bf16 has no tensor cores or matrix units here, likely slower than fp32" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        assert Precision.resolve("fp16", gpu).name == "fp16" and Precision.resolve("tf32", CPU).name == "tf32"
    assert "bf16" not in caplog.text and "cpu has no TF32 matmuls: tf32 computes as fp32" in caplog.text
    assert "fp32 matmuls: this GPU has no TF32" in Precision.resolve("auto", gpu).reason


def test_choices_a_rocm_or_xpu_gpu_would_emulate_are_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(gcnArchName="gfx906"))
    monkeypatch.setattr(torch.xpu, "get_device_properties",
                        lambda device=None: SimpleNamespace(has_subgroup_matrix_multiply_accumulate=False))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        assert Precision.resolve("bf16", torch.device("cuda", 0)).name == "bf16"
        assert Precision.resolve("bf16", torch.device("xpu", 0)).name == "bf16"
    assert "ROCm GPU gfx906 lacks bf16 matrix instructions: bf16 has no tensor cores or matrix units" in caplog.text
    assert "XPU does not report matrix engines (subgroup matrix multiply-accumulate): bf16 has no" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bertqa"):  # fp16 runs at twice the fp32 rate on them even so
        Precision.resolve("fp16", torch.device("cuda", 0))
        Precision.resolve("fp16", torch.device("xpu", 0))
    assert caplog.text == ""


def test_other_accelerators_never_get_a_guessed_precision():
    assert Precision.resolve("auto", torch.device("meta")).name == "fp32"


def test_explicit_choices_are_kept_and_emulation_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        p = Precision.resolve("bf16", CPU, features={"avx2": True})
    assert p.name == "bf16" and p.reason == "asked for" and "emulated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bertqa"):
        Precision.resolve("bf16", CPU, features={"avx512_bf16": True})
    assert caplog.text == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bertqa"):  # (mutation review) fp16 too
        assert Precision.resolve("fp16", CPU, features={"avx2": True}).name == "fp16"
    assert "fp16 will be emulated" in caplog.text
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        Precision.resolve("fp8", CPU)


@pytest.mark.parametrize("before", ["highest", "high", "medium"])
def test_scope_restores_what_it_changed(fp32_settings, before):
    """(mutation review: the caller's own setting, not only the default)"""
    torch.set_float32_matmul_precision(before)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # (what torch makes of it)
    with Precision("tf32", CPU).scope():
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    with Precision("fp32", CPU).scope():
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == before and torch.backends.cuda.matmul.allow_tf32 == tf32
    with pytest.raises(RuntimeError), Precision("tf32", CPU).scope():
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == before


@pytest.fixture
def fp32_settings():
    """Puts torch's float32 precision settings back as they were (legacy flags, then the per-backend ones)."""
    b = torch.backends
    backends = [b, b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul]  # (mkldnn's own setter sets b's)
    legacy = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    newer = [(x, x.fp32_precision) for x in backends]
    yield b
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = legacy[:2]
    torch.set_float32_matmul_precision(legacy[2])
    for x, value in newer:
        x.fp32_precision = value


def test_scope_works_under_torchs_per_backend_precision_settings(fp32_settings):
    b = fp32_settings
    # A caller (transformers' enable_tf32, torch's own advice) set TF32 through the newer API: the legacy flags
    # no longer read, and the scope read them.
    b.cuda.matmul.fp32_precision = "tf32"
    b.mkldnn.matmul.fp32_precision = "bf16"
    with Precision("fp32", CPU).scope():
        assert b.cuda.matmul.fp32_precision == "ieee" and b.mkldnn.matmul.fp32_precision == "ieee"
    assert b.cuda.matmul.fp32_precision == "tf32" and b.mkldnn.matmul.fp32_precision == "bf16"
    with Precision("tf32", CPU).scope():
        assert b.cuda.matmul.fp32_precision == "tf32"
    assert b.cuda.matmul.fp32_precision == "tf32" and b.mkldnn.matmul.fp32_precision == "bf16"


def test_scope_leaves_both_apis_readable_and_as_they_were(fp32_settings):
    b = fp32_settings
    before = [(x, x.fp32_precision) for x in (b, b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul)]
    legacy = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    for name in ("tf32", "fp32", "bf16"):
        with Precision(name, CPU).scope():
            assert b.cuda.matmul.allow_tf32 == (name == "tf32")  # the legacy flags read inside it too
        assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == legacy
        assert [(x, x.fp32_precision) for x, _ in before] == before


def test_autocast_only_for_half_precisions():
    assert Precision("bf16", CPU).autocast_dtype == torch.bfloat16
    with Precision("bf16", CPU).autocast():
        assert torch.is_autocast_enabled("cpu")
    with Precision("fp32", CPU).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with Precision("bf16", CPU).autocast(), Precision("fp32", CPU).autocast():  # (an fp32 call inside a bf16 one)
        assert not torch.is_autocast_enabled("cpu")


def test_rng_state_round_trip():
    state = rng_state(CPU)
    a = torch.rand(3)
    set_rng_state(state, CPU)
    assert torch.equal(a, torch.rand(3))


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyError("interrupted")
    assert target.read_text() == '{\n    "v": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write_json(target, {"v": 2})
    assert '"v": 2' in target.read_text() and len(list(tmp_path.iterdir())) == 1


def test_a_full_disk_names_the_file_not_its_temp(tmp_path, monkeypatch):
    from bertqa.cli import message_line

    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as e, atomic_path(target) as tmp:
        tmp.write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full disk raises: no file name
    assert message_line(e.value) == f"{target}: No space left on device"

    def io_error(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError) as e, atomic_path(target, durable=True) as tmp:
        tmp.write_text("{}")
    assert message_line(e.value) == f"{target}: Input/output error" and list(tmp_path.iterdir()) == []
    # A folder: an error that names a file in its temporary folder names the folder's own; one that names none,
    # the folder. An error naming a file elsewhere (a source being read) is left alone.
    folder = tmp_path / "model"
    for named, shown in (("sub/w.bin", folder / "sub" / "w.bin"), (None, folder), ("/elsewhere/x", "/elsewhere/x")):
        with pytest.raises(OSError) as e, atomic_dir(folder) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([] if named is None else [str(tmp / named)]))
        assert message_line(e.value) == f"{shown}: No space left on device" and not folder.exists()


def test_a_metrics_line_the_disk_refuses_names_the_file(tmp_path, monkeypatch):
    from bertqa.cli import message_line
    from bertqa.train import MetricsLog

    if not os.path.exists("/dev/full"):
        platform_skip("no /dev/full (Linux's device on which every write fails as on a full disk)")
    log = MetricsLog(tmp_path, tensorboard=False)
    full = os.open("/dev/full", os.O_WRONLY)  # every write there fails as on a full disk
    os.dup2(full, log.file.fileno())  # the log's own file object now writes there
    os.close(full)
    with pytest.raises(OSError) as e:
        log.log({"step": 1, "loss": 2.0})
    assert message_line(e.value) == f"{tmp_path / 'metrics.jsonl'}: No space left on device"
    log.close()  # nothing left to write: a line the disk refused is not kept to fail again
    log.file = open(log.path, "ab", buffering=0)

    def io_error(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError) as e:
        log.sync()
    assert message_line(e.value) == f"{tmp_path / 'metrics.jsonl'}: Input/output error"
    monkeypatch.undo()
    log.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the names of open files in /proc")
def test_a_durable_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """So that a power loss leaves the old checkpoint or the new one, never a renamed file whose data never
    reached the disk."""
    import os

    import bertqa.files as files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    target = tmp_path / "checkpoint.pt"
    with atomic_path(target, durable=True) as tmp:
        tmp.write_text("state")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".checkpoint.")) and events[2][1] == str(tmp_path)
    events.clear()
    with atomic_path(target) as tmp:  # everything else: no fsync
        tmp.write_text("again")
    assert events == [("replace", str(target))] and target.read_text() == "again"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the names of open files in /proc")
def test_a_durable_folder_is_flushed_before_it_replaces_the_old_one_then_the_old_one_goes(tmp_path, monkeypatch):
    """A model folder replaces the user's previous model: a power loss must leave one of the two whole, not the new
    folder's names with data that never reached the disk and the old folder already deleted."""
    import bertqa.files as files

    events = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, files.shutil.rmtree
    monkeypatch.setattr(files.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(files.os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    monkeypatch.setattr(
        files.shutil, "rmtree", lambda p, **kw: events.append(("rmtree", str(p))) or real_rmtree(p, **kw)
    )
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:  # not durable: no fsync
        (tmp / "old").write_text("previous")
    assert [e[0] for e in events] == ["rename", "rmtree"]
    events.clear()
    with atomic_dir(target, durable=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w").write_text("weights")
        (tmp / "config.json").write_text("{}")
    kinds = [e[0] for e in events]
    renames = [i for i, k in enumerate(kinds) if k == "rename"]
    synced = {Path(p).relative_to(tmp).as_posix() for k, p in events[: renames[0]] if k == "fsync"}
    assert synced == {".", "sub", "sub/w", "config.json"}  # every file and folder, before the first rename
    assert kinds[renames[0] :] == ["rename", "rename", "fsync", "rmtree", "rmtree"]  # old aside, new in, flush
    assert events[renames[1] + 1][1] == str(tmp_path)  # the renames flushed; then the old folder goes
    assert events[-2][1].startswith(str(tmp_path / ".model.old-"))
    assert (target / "sub" / "w").read_text() == "weights" and not (target / "old").exists()


def test_a_file_system_that_cannot_flush_a_folder_still_gets_the_folder(tmp_path, monkeypatch):
    import errno

    import bertqa.files as files

    real_fsync = files.os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # as some file systems answer for folders
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with atomic_dir(tmp_path / "model", durable=True) as tmp:
        (tmp / "w").write_text("weights")
    assert (tmp_path / "model" / "w").read_text() == "weights"
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error") as e, atomic_dir(tmp_path / "model", durable=True) as tmp:
        (tmp / "w").write_text("new")  # a failed flush is an error: the data may not be on the disk
    assert (tmp_path / "model" / "w").read_text() == "weights"
    assert e.value.filename == str(tmp_path / "model" / "w")  # the folder's file, not the temporary folder's
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    with pytest.raises(OSError, match="Invalid argument"), atomic_dir(tmp_path / "model", durable=True) as tmp:
        (tmp / "w").write_text("new")  # EINVAL for a file's data is a failure too
    assert (tmp_path / "model" / "w").read_text() == "weights"


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["a"] and len(list(tmp_path.iterdir())) == 1
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"] and len(list(tmp_path.iterdir())) == 1


def test_a_folder_named_through_a_link_and_dotdot_is_the_one_the_checks_saw(tmp_path, monkeypatch):
    """`link/../mine` is, to the kernel (and to every check before the run), `mine` beside where the link leads;
    atomic_dir read it as text, and replaced the user's own `mine` beside the link."""
    from bertqa.files import check_output_dir

    (tmp_path / "real" / "deep" / "x").mkdir(parents=True)
    (tmp_path / "work" / "mine").mkdir(parents=True)
    (tmp_path / "work" / "mine" / "notes.txt").write_text("the user's")
    (tmp_path / "work" / "link").symlink_to("../real/deep/x")
    monkeypatch.chdir(tmp_path / "work")
    check_output_dir("link/..", writes=("mine/",))  # there is no `mine` where it looks: nothing to refuse
    with atomic_dir("link/../mine") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "work" / "mine" / "notes.txt").read_text() == "the user's"
    assert [p.name for p in (tmp_path / "real" / "deep" / "mine").iterdir()] == ["config.json"]


def test_a_folder_that_cannot_be_moved_aside_is_named_alone(tmp_path, monkeypatch):
    """Moving a folder to another parent needs it writable: the error named the temporary folder too, gone by then."""
    import pathlib

    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("old")
    rename = pathlib.Path.rename

    def refused(self, target):
        if ".model.old-" in str(target):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self), None, str(target))
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", refused)
    with pytest.raises(PermissionError) as e, atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("new")
    assert str(e.value) == f"[Errno {errno.EACCES}] {os.strerror(errno.EACCES)}: '{tmp_path / 'model'}'"
    assert (tmp_path / "model" / "config.json").read_text() == "old" and list(tmp_path.iterdir()) == [
        tmp_path / "model"
    ]
    # The check before a run (train's --output-dir, convert's folder) refuses it first, not after the work.
    from bertqa.checkpoint import CheckpointError, check_save_target
    from bertqa.files import check_output_dir

    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "model" and access(p, mode))
    with pytest.raises(ValueError, match=r"model/? cannot be replaced: it is not writable here"):
        check_output_dir(tmp_path, writes=("model/",))
    with pytest.raises(CheckpointError, match=r"model: cannot be replaced: it is not writable here"):
        check_save_target(tmp_path / "model")


def test_a_failed_write_through_dotdot_removes_the_folders_it_made(tmp_path, monkeypatch):
    from bertqa.files import write_json_files

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
        write_json_files({"new/../x/p.json": {"a": float("nan")}})  # JSON has no NaN
    assert list(tmp_path.iterdir()) == []  # `new` was made for it too
    (tmp_path / "x").mkdir()  # the user's own (empty) folder: `new/../x` is it, not a folder made for the write
    with pytest.raises(ValueError):
        write_json_files({"new/../x/p.json": {"a": float("nan")}})
    assert list(tmp_path.iterdir()) == [tmp_path / "x"]


def test_output_checks_look_where_links_lead(tmp_path):
    from bertqa.files import check_output, check_output_dir

    (tmp_path / "gone").symlink_to(tmp_path / "nowhere" / "sub")
    with pytest.raises(ValueError, match=r"--output .*gone/p.json: its folder .*gone: a symbolic link to nothing"):
        check_output(tmp_path / "gone" / "p.json", ".json")
    (tmp_path / "afile").write_text("")
    (tmp_path / "link.json").symlink_to(tmp_path / "afile" / "real.json")  # written through: into a file
    with pytest.raises(ValueError, match=r"cannot write in .*afile"):
        check_output(tmp_path / "link.json", ".json")
    # A --model file that is a link (an HF cache's snapshot): its folder holds the config and tokenizer it reads.
    model = tmp_path / "out" / "model"
    model.mkdir(parents=True)
    for name in ("config.json", "vocab.txt"):
        (model / name).write_text("{}")
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"weights")
    (model / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    for given in (model, model / "model.safetensors"):
        with pytest.raises(ValueError, match="would write .*model over --model .*, its own input"):
            check_output_dir(tmp_path / "out", writes=("model/",), inputs={"--model": str(given)})


def test_a_failed_atomic_write_removes_the_folders_it_made_and_names_its_output(tmp_path, monkeypatch):
    import functools
    import tempfile

    from bertqa.files import scratch_dir

    for write in (atomic_path, atomic_dir):
        with pytest.raises(KeyboardInterrupt), write(tmp_path / "new" / "sub" / "out.json"):
            raise KeyboardInterrupt
        assert list(tmp_path.iterdir()) == []  # new/sub/ were made for it, and nothing was written there

    def refused(*args, dir=None, prefix="", **kwargs):  # a folder it may not write in (where a link leads, say)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}x1y2z3w4"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    target = tmp_path / "new" / "out.onnx"
    for write in (atomic_path, atomic_dir, functools.partial(scratch_dir, kind="onnx-export")):
        with pytest.raises(PermissionError) as e, write(target):
            pass
        assert e.value.filename == str(target) and list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_usual_permissions(tmp_path, monkeypatch):
    import bertqa.files

    monkeypatch.setattr(bertqa.files, "_UMASK", 0o022)
    write_json(tmp_path / "a.json", {})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "x").stat().st_mode & 0o777 == 0o644


def test_a_folder_replaced_whole_keeps_its_modes(tmp_path, monkeypatch):
    """(review) A model folder made private (0700, its files 0600) came back world-readable after the next convert
    or train: the folder keeps its mode, a file its own, and a new file takes no permission the folder withheld."""
    import bertqa.files

    monkeypatch.setattr(bertqa.files, "_UMASK", 0o022)
    (tmp_path / "d").mkdir()
    for name, mode in (("config.json", 0o600), ("vocab.txt", 0o640)):
        (tmp_path / "d" / name).write_text("old")
        (tmp_path / "d" / name).chmod(mode)
    # A link the old folder held, that cannot be followed (a name too long): its target's mode is not read
    (tmp_path / "d" / "tokenizer.json").symlink_to("/" + "x" * 300)
    (tmp_path / "d").chmod(0o750)
    with atomic_dir(tmp_path / "d") as tmp:
        for name in ("config.json", "vocab.txt", "model.safetensors", "tokenizer.json"):
            (tmp / name).write_text("new")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d").iterdir()}
    assert modes == {"config.json": 0o600, "vocab.txt": 0o640, "model.safetensors": 0o640, "tokenizer.json": 0o640}
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750 and (tmp_path / "d" / "config.json").read_text() == "new"


def test_sync_and_rng_address_the_device_itself_not_the_current_one(monkeypatch):
    """cuda:1 is not torch.cuda's current device unless set: called without a device, these would time, save
    and restore cuda:0."""
    from bertqa.runtime import synchronize

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or "s")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state, device="cuda": calls.append((new_state, device)))
    gpu1 = torch.device("cuda", 1)
    synchronize(gpu1)
    state = rng_state(gpu1)
    set_rng_state(state, gpu1)
    assert calls == [("sync", gpu1), ("get", gpu1), ("s", gpu1)] and state["cuda"] == "s"
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))  # one device: no argument
    synchronize(torch.device("mps"))
    assert calls[-1] == "mps"


def test_an_existing_files_mode_is_kept_and_a_symlink_is_written_through(tmp_path):
    private = tmp_path / "private.json"
    write_json(private, {"v": 1})
    private.chmod(0o600)
    write_json(private, {"v": 2})
    assert private.stat().st_mode & 0o777 == 0o600 and '"v": 2' in private.read_text()
    target, link = tmp_path / "runs" / "pred.json", tmp_path / "latest.json"
    write_json(target, {"v": 1})
    link.symlink_to(os.path.relpath(target, tmp_path))
    write_json(link, {"v": 2})  # as `> latest.json` in a shell: the file it points to is rewritten
    assert link.is_symlink() and '"v": 2' in target.read_text()
    # An earlier run's output removed through a link (evaluate's summary.json, a v1.1 run's null_odds.json): the link
    # stays, and the next write lands in its target again (the link was deleted, and then replaced by a file).
    remove_output(link)
    assert link.is_symlink() and not target.exists()
    write_json(link, {"v": 3})
    assert link.is_symlink() and '"v": 3' in target.read_text()
    folder_link = tmp_path / "model"
    folder_link.symlink_to("runs")
    with atomic_dir(folder_link) as tmp:
        (tmp / "weights").write_text("new")
    assert folder_link.is_symlink() and [p.name for p in (tmp_path / "runs").iterdir()] == ["weights"]


def test_a_file_name_of_the_longest_legal_length_is_written_and_its_leftovers_found(tmp_path):
    name = "模" * 80 + ".json"  # 245 bytes: legal, but with a temporary name's 14 more bytes it would not be
    write_json(tmp_path / name, {"v": 1})
    assert json.loads((tmp_path / name).read_text()) == {"v": 1}
    with atomic_path(tmp_path / name) as tmp:
        tmp.write_text("{}")
    tmp.write_text("half")  # its name, as the same write killed outright leaves it
    assert len(os.fsencode(tmp.name)) <= 255 and remove_stale_temps(tmp_path / name) == [tmp]
    folder = tmp_path / ("d" * 250)
    with atomic_dir(folder) as tmp:
        (tmp / "x").write_text("")
    with atomic_dir(folder) as tmp:  # replacing it moves the old one aside under another long name
        (tmp / "y").write_text("")
    assert [p.name for p in folder.iterdir()] == ["y"] and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("preset", [None, "7"])
def test_import_caps_the_cpu_kernel_caches_unless_the_user_set_them(preset):
    """`import bertqa` caps oneDNN's and ideep's per-shape kernel caches (which grew resident memory by ~10 MB a
    training step), before torch compiles its first kernel; a value already in the environment is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    if preset is not None:
        env["LRU_CACHE_CAPACITY"] = preset
    code = "import os, bertqa; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["64", preset or "64"]


def test_a_folder_to_make_under_a_file_names_the_file(tmp_path):
    """(review) `download squad --dir afile/sub`, `convert MODEL afile/x`: the kernel's "File exists" named the file
    but not what was wrong with it."""
    from bertqa.cli import message_line
    from bertqa.files import folder_for

    (tmp_path / "afile").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for name, what in (("afile", "a file"), ("gone", "a symbolic link to nothing")):
        with pytest.raises(NotADirectoryError) as e, folder_for(tmp_path / name / "sub" / "deeper"):
            pass
        assert message_line(e.value) == f"{tmp_path / name}: is {what}, where a folder is needed"
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["afile", "gone"] and (tmp_path / "afile").read_text() == "mine"
    )


def test_check_output_takes_a_name_of_the_longest_legal_length_and_refuses_one_byte_more(tmp_path):
    """(mutation review) NAME_MAX (255 bytes) is the longest legal name, not one too long."""
    from bertqa.files import check_output

    for size, ok in ((255, True), (256, False)):
        output = tmp_path / ("p" * (size - len(".json")) + ".json")
        if ok:
            assert check_output(output, ".json") == output
        else:
            with pytest.raises(ValueError, match="the name of the file is longer than 255 bytes"):
                check_output(output, ".json")


def test_a_folder_whose_new_version_cannot_be_renamed_into_place_is_put_back(tmp_path, monkeypatch):
    """(mutation review) The second rename failing (a full disk, say) puts the previous folder back whole, and the
    error is that rename's."""
    import errno

    target = tmp_path / "model"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    rename = Path.rename

    def full(self, dst):
        if Path(dst).name == "model" and self.name.startswith(".model.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return rename(self, dst)

    monkeypatch.setattr(Path, "rename", full)
    with pytest.raises(OSError) as e, atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "mine.txt").read_text() == "mine"
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
