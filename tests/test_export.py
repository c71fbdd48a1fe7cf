"""ONNX export: the graph matches PyTorch at shapes other than the traced one, int8 shrinks it without moving
the answers much, and a bad or failed export leaves no file behind."""

import json
import logging
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from skips import platform_skip

from bertqa import export
from bertqa.checkpoint import load_model, save_pretrained
from bertqa.export import OnnxRunner, check_windows, export_onnx
from bertqa.files import exclusive
from bertqa.inference import NonFiniteLogits, predict_logits
from bertqa.tokenizer import load_tokenizer

# Short windows keep the tiny model's check quick, and give the built-in long sample many windows.
WINDOWS = {"max_seq_length": 96, "doc_stride": 32, "max_query_length": 32}


@pytest.fixture(scope="module")
def fp32_graph(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_onnx(tiny_dir, path, verbose=False, **WINDOWS)


@pytest.fixture
def reuse_trace(monkeypatch, fp32_graph):
    """Stand in the already-exported graph for a new trace: later tests pay only for what they test."""
    path, report = fp32_graph

    def copy(model, dst, opset, pad_id):
        shutil.copyfile(path, dst)
        return report["opset"]

    monkeypatch.setattr(export, "_export_graph", copy)


def test_export_writes_one_loadable_file(fp32_graph):
    path, report = fp32_graph
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary or external-data files
    assert report["size_bytes"] == path.stat().st_size and not report["int8"]
    assert report["max_abs_diff"] <= 1e-4 and report["windows"] > 4
    # (mutation review) Checked at a second shape: the shortest window alone, shorter than the first batch's.
    (n, longest), (one, shortest) = [map(int, shape.split(" x ")) for shape in report["shapes"]]
    assert n == report["windows"] and one == 1 and shortest < longest
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "token_type_ids", "attention_mask"]
    assert all(i.type == "tensor(int64)" and all(isinstance(d, str) for d in i.shape) for i in inputs.values())
    assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]


def test_parity_at_other_batch_sizes_and_lengths(fp32_graph, tiny_dir):
    features = check_windows(load_tokenizer(tiny_dir), **WINDOWS)
    # The graph was traced at batch 2 x 16 tokens; these windows are longer and of several lengths.
    assert features.lengths.min() > 16 and len(set(features.lengths.tolist())) > 2
    model = load_model(tiny_dir, verbose=False)
    real = features.attention_mask()
    runner = OnnxRunner(fp32_graph[0], threads=1)
    assert runner.session.get_session_options().intra_op_num_threads == 1
    for rows in (np.arange(len(features)), np.array([0, 1])):  # the graph's mask: exactly each window's tokens
        T = int(features.lengths[rows].max())
        assert np.array_equal(export._array_batch(features, rows)["attention_mask"], real[rows, :T])
    for batch_size in (1, 3):
        got = runner.predict_logits(features, batch_size=batch_size)
        ref = predict_logits(model, features, np.arange(len(features)), batch_size, torch.device("cpu"))
        for a, b in zip(got, ref):
            assert a.shape == b.shape and a.dtype == np.float32
            assert np.array_equal(np.isneginf(a), np.isneginf(b))  # the same -inf beyond each batch's length
            assert np.abs(a[real] - b[real]).max() <= 1e-4
    # No windows asked for, as a plain list (an empty list is an array of floats to numpy): no logits.
    for got in (runner.predict_logits(features, []), predict_logits(model, features, [], 2, torch.device("cpu"))):
        assert [(a.shape, a.dtype) for a in got] == [((0, features.max_seq_length), np.float32)] * 2


def test_int8_is_smaller_and_keeps_the_answers(reuse_trace, fp32_graph, tiny_dir, tmp_path, capsys):
    import logging

    path = tmp_path / "int8.onnx"
    # As in a process whose root logger has no handlers yet (pytest's own make logging.basicConfig do nothing):
    # onnxruntime's basicConfig is taken back, so that the caller's own still works.
    root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], logging.getLogger().level
    root.handlers.clear()
    root.setLevel(logging.INFO)
    try:
        report = export_onnx(tiny_dir, path, int8=True, **WINDOWS)
        assert root.handlers == [] and root.level == logging.INFO  # (its level is set while it quantises)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert report["int8"] and report["size_bytes"] == path.stat().st_size
    assert report["fp32_size_bytes"] == fp32_graph[1]["size_bytes"]
    assert report["size_bytes"] < report["fp32_size_bytes"] / 2
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    # int8 weights (u8s8), with one scale per column, not one per matrix (which cost 1.8 F1).
    graph = onnx.load(str(path)).graph
    weights = {i.name: i for i in graph.initializer}
    quantized = [weights[n.input[1]] for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in weights]
    assert len(quantized) >= 12 and {i.data_type for i in quantized} == {onnx.TensorProto.INT8}  # 6 a layer
    scales = [weights[i.name.removesuffix("_quantized") + "_scale"] for i in quantized]
    assert all(len(s.dims) == 1 and s.dims[0] == i.dims[-1] > 1 for s, i in zip(scales, quantized))
    assert 0 < report["max_abs_diff"] < 0.1
    assert report["start_argmax_agreement"] >= 0.75 and report["end_argmax_agreement"] >= 0.75
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("bertqa: ") for line in lines[:-1]) and json.loads(lines[-1]) == report
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


def test_bad_output_is_one_line_and_writes_nothing(tiny_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.onnx").mkdir()
    cases = [
        (tmp_path / "dir.onnx", r"^--output \S+dir\.onnx: is a folder; name the \.onnx file to write$"),
        (tmp_path / "model.txt", r"^--output \S+model\.txt: must end in \.onnx$"),
        (tmp_path, r"^--output \S+: must end in \.onnx$"),
        (tmp_path / ".onnx", r"^--output \S+/\.onnx: name the file before the \.onnx$"),  # (review: "must end")
        (tmp_path / "file" / "model.onnx", r"^--output \S+model\.onnx: cannot write in \S+file$"),
    ]
    for output, message in cases:
        with pytest.raises(ValueError, match=message):
            export_onnx(tiny_dir, output, verbose=False)
    with pytest.raises(FileNotFoundError, match=r"^--model \S+nowhere: no such checkpoint file or folder$"):
        export_onnx(tmp_path / "nowhere", tmp_path / "model.onnx", verbose=False)
    with pytest.raises(ValueError, match=r"^--max-query-length must be a positive integer, got 0$"):
        export_onnx(tmp_path / "nowhere", tmp_path / "model.onnx", max_query_length=0, verbose=False)  # before all
    with pytest.raises(FileNotFoundError, match=r"^--check-file \S+none\.json: no such file$"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", check_file=tmp_path / "none.json", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file"]


def test_export_never_writes_over_its_own_input(tiny_dir, tmp_path, monkeypatch):
    """The check file, the model file and the config file are the run's inputs: an --output naming one of them
    (or a link to one) is refused before any work, and the file is left as it was."""
    monkeypatch.setattr(export, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    squad = tmp_path / "check.onnx"
    squad.write_text(json.dumps({"version": "1.1", "data": []}))
    weights = tmp_path / "weights.onnx"
    shutil.copyfile(tiny_dir / "model.safetensors", weights)
    config = tmp_path / "config.onnx"
    shutil.copyfile(tiny_dir / "config.json", config)
    (tmp_path / "link.onnx").symlink_to(squad)
    cases = [
        ({"check_file": squad}, squad, "--check-file"),
        ({"check_file": squad}, tmp_path / "link.onnx", "--check-file"),
        ({"config": config}, config, "--config"),
    ]
    for kwargs, output, flag in [*cases, ({}, weights, "--model")]:
        model = weights if flag == "--model" else tiny_dir
        before = {p: p.read_bytes() for p in (squad, weights, config)}
        with pytest.raises(
            ValueError, match=rf"^--output \S+: this run would write \S+ over {flag} \S+, its own input$"
        ):
            export_onnx(model, output, verbose=False, **kwargs)
        assert {p: p.read_bytes() for p in before} == before


def test_a_bad_check_file_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "squad.json").mkdir()
    with pytest.raises(ValueError, match=r"^--check-file \S+squad\.json: is a folder, not a SQuAD JSON file$"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", check_file=tmp_path / "squad.json", verbose=False)
    (tmp_path / "bad.json").write_text('{"version": "1.1", "data": [{"paragraphs": 3}]}')
    with pytest.raises(ValueError, match=r"^\S+bad\.json: "):
        export_onnx(tiny_dir, tmp_path / "model.onnx", check_file=tmp_path / "bad.json", verbose=False)
    with pytest.raises(ValueError, match=r"^--check-file '': empty; name a SQuAD JSON file, or leave the flag out$"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", check_file="", verbose=False)  # ("is a folder": the current one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "squad.json"]


def test_an_opset_the_graph_cannot_take_is_refused(tiny_dir, tmp_path, caplog, monkeypatch):
    """The exporter writes its own opset and converts it; where that fails (99, for an onnx that would know it) it
    keeps its own, logging a traceback, and the file was written. Below 17 (no LayerNormalization), or beyond what
    the installed onnx knows (2**31 was an internal error, a bug's line), it is refused before the model is loaded."""
    with pytest.raises(ValueError, match=r"^--opset 16: the graph needs opset 17 or later"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", opset=16, verbose=False, **WINDOWS)
    known = onnx.defs.onnx_opset_version()
    with pytest.raises(ValueError, match=rf"^--opset {2**31}: the installed onnx knows opsets up to {known}$"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", opset=2**31, verbose=False, **WINDOWS)
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 100)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"^--opset 99: .* \(it stays at opset"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", opset=99, verbose=False, **WINDOWS)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [] and not [r for r in caplog.records if r.name.startswith("onnxscript")]
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.DEBUG)
    try:
        report = export_onnx(tiny_dir, tmp_path / "model.onnx", opset=17, verbose=False, **WINDOWS)
        assert onnx_logger.level == logging.DEBUG  # the exporter's loggers are quiet while it runs, then as they were
    finally:
        onnx_logger.setLevel(level)
    assert report["opset"] == 17 and onnx.load(tmp_path / "model.onnx").opset_import[0].version == 17


def test_failed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def half_written(model, dst, opset, pad_id):
        dst.write_bytes(b"\x08\x07partial")
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(export, "_export_graph", half_written)
    for int8 in (False, True):
        with pytest.raises(RuntimeError, match="exporter failed"):
            export_onnx(tiny_dir, tmp_path / "model.onnx", int8=int8, verbose=False, **WINDOWS)
    assert list(tmp_path.iterdir()) == []
    # Nor the folders made for the output (a folder that was there stays, empty or not).
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(tiny_dir, tmp_path / "kept" / "new" / "sub" / "model.onnx", verbose=False, **WINDOWS)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_parity_failure_keeps_the_previous_file(reuse_trace, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)  # no graph can pass: the failure path runs
    with pytest.raises(ValueError, match=r"^export onnx: the graph's logits differ .*model\.onnx not written$"):
        export_onnx(tiny_dir, out, verbose=False, **WINDOWS)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_an_int8_export_on_a_full_disk_says_so(reuse_trace, tiny_dir, tmp_path, monkeypatch):
    """(review) Quantisation writes a copy of the graph through onnx's C++, which does not say when the disk is
    full: the copy was read back cut short, an internal error (protobuf's DecodeError) in place of the full disk."""
    import onnxruntime.quantization.quant_utils as quant_utils

    def cut_short(src, dst, *args, **kwargs):  # what a full disk leaves of the copy, quietly
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[:1000])

    monkeypatch.setattr(quant_utils.onnx.shape_inference, "infer_shapes_path", cut_short)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(OSError, match=rf"No space left on device: '{out}'"):
        export_onnx(tiny_dir, out, int8=True, verbose=False, **WINDOWS)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_graph_whose_path_is_not_utf8_is_exported_and_run(reuse_trace, tiny_dir, tmp_path):
    """(review) onnxruntime opens UTF-8 paths only (and quantisation's shape inference too): an --output named with a
    byte that is not (a surrogate escape in Python) failed after the export, blamed on the graph."""
    if sys.platform == "darwin" or os.name == "nt":
        platform_skip("file names here are Unicode: a name's byte cannot be other than UTF-8")
    for int8 in (False, True):
        out = tmp_path / os.fsdecode(b"m\xff.onnx" if not int8 else b"\xff/q.onnx")
        out.parent.mkdir(exist_ok=True)
        report = export_onnx(tiny_dir, out, int8=int8, verbose=False, **WINDOWS)
        assert report["int8"] is int8 and OnnxRunner(out).session.get_inputs()


def test_a_killed_exports_scratch_is_cleared_and_a_live_ones_kept(reuse_trace, tiny_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bertqa")
    stale, live = tmp_path / ".onnx-export-k1ll3d00", tmp_path / ".onnx-export-l1v3l1v3"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "fp32.onnx").write_bytes(b"half a graph")
    with exclusive(live):  # held as a running export holds it
        export_onnx(tiny_dir, tmp_path / "model.onnx", int8=True, verbose=False, **WINDOWS)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model.onnx"]
        assert (live / "fp32.onnx").read_bytes() == b"half a graph"
    assert f"removed {stale}, left by a run that was killed" in caplog.text


def test_non_finite_weights_or_logits_are_named_not_blamed_on_the_graph(reuse_trace, tiny_dir, tmp_path):
    for name, value, message in [
        ("bert.encoder.layer.1.output.dense.weight", float("nan"),
         r"--model .*: its weight bert\.encoder\.layer\.1\.output\.dense\.weight holds NaN or infinite values"),
        ("qa_outputs.weight", 3e38, r"PyTorch's own logits are NaN or infinite on the check windows"),  # overflow
    ]:  # fmt: skip
        model = load_model(tiny_dir, verbose=False)
        with torch.no_grad():
            model.get_parameter(name)[0].fill_(value)
        save_pretrained(model, load_tokenizer(tiny_dir), tmp_path / "bad")
        with pytest.raises(NonFiniteLogits, match=f"^{message}; nothing exported$"):
            export_onnx(tmp_path / "bad", tmp_path / "model.onnx", verbose=False, **WINDOWS)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_check_file_windows(tiny_dir, tmp_path):
    context = "The lighthouse on the cape was kept by Marta Olsen for forty years. " * 12
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": f"q{i}", "question": f"Who kept the lighthouse {i}?"}  # a file to predict on: no answers
        for i in range(20)]}]}]}  # fmt: skip
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad))
    features = check_windows(load_tokenizer(tiny_dir), path, **WINDOWS)
    assert len(features) == export.CHECK_WINDOWS and len(set(features.example_index.tolist())) > 1


def test_the_runner_refuses_nan_logits_naming_the_window(fp32_graph, tiny_dir):
    from bertqa.inference import NonFiniteLogits

    features = check_windows(load_tokenizer(tiny_dir), **WINDOWS)
    runner = OnnxRunner(fp32_graph[0], threads=1)
    session = runner.session

    class Poisoned:  # NaN in the first row of every batch, as a graph that overflows there would give
        def run(self, names, feed):
            start, end = session.run(names, feed)
            start[0, 3] = np.nan
            return start, end

    runner.session = Poisoned()
    first = int(np.argsort(features.lengths, kind="stable")[0])  # batches run shortest first
    with pytest.raises(NonFiniteLogits, match=f"NaN or infinite for window {first}:"):
        runner.predict_logits(features, batch_size=len(features))


def test_the_runner_names_a_batch_the_graph_cannot_run(fp32_graph, capfd):
    """Windows longer than the model's 512 positions: onnxruntime's own error (a broadcast it cannot do) was
    raised as it came, naming neither the graph nor the batch, then said only that (the graph records its
    positions now), with onnxruntime's own line on stderr besides; token ids past the vocabulary still reach it."""
    runner = OnnxRunner(fp32_graph[0], threads=1)
    assert runner.max_positions == 512
    ids = np.full((2, 600), 1000, dtype=np.int64)
    with pytest.raises(ValueError, match=r"^\S+model\.onnx: a batch of 600 tokens is longer than the graph's 512 "
                                         r"positions \(its model's max_position_embeddings\)$"):  # fmt: skip
        runner(ids, np.zeros_like(ids), np.ones_like(ids))
    ids = np.full((1, 512), 1000, dtype=np.int64)  # as long as the graph goes
    assert runner(ids, np.zeros_like(ids), np.ones_like(ids))[0].shape == (1, 512)
    ids = np.full((2, 600), 1000, dtype=np.int64)
    runner.max_positions = None  # (a graph exported before it was recorded)
    with pytest.raises(ValueError, match=r"^\S+model\.onnx: onnxruntime cannot run a batch of 2 x 600 tokens \("):
        runner(ids, np.zeros_like(ids), np.ones_like(ids))
    ids = np.full((2, 8), 10**6, dtype=np.int64)
    with pytest.raises(ValueError, match=r"^\S+model\.onnx: onnxruntime cannot run a batch of 2 x 8 tokens \("):
        runner(ids, np.zeros_like(ids), np.ones_like(ids))
    assert "onnxruntime" not in capfd.readouterr().err
    with pytest.raises(
        ValueError, match=r"^threads must be a positive integer \(0 or None: onnxruntime's default\), got -1$"
    ):
        OnnxRunner(fp32_graph[0], threads=-1)


def test_runner_rejects_a_file_that_is_not_a_graph(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ValueError, match=r"^\S+bad\.onnx: not a loadable ONNX graph"):
        OnnxRunner(bad)
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        OnnxRunner(tmp_path / "missing.onnx")
    (tmp_path / "folder.onnx").mkdir()  # was "no such ONNX file"
    with pytest.raises(ValueError, match=r"folder\.onnx: is a folder, not an ONNX file$"):
        OnnxRunner(tmp_path / "folder.onnx")


def other_graph(path, nodes, inputs, outputs):
    """A hand-made ONNX graph (opset 17) saved at `path`: nodes, and (name, element type, shape) inputs and outputs."""
    from onnx import helper

    values = [[helper.make_tensor_value_info(*io) for io in group] for group in (inputs, outputs)]
    model = helper.make_model(helper.make_graph(nodes, "other", *values), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_runner_rejects_a_graph_without_the_logits(tmp_path):
    from onnx import TensorProto, helper

    inputs = [(name, TensorProto.INT64, ["b", "t"]) for name in export.INPUTS]
    nodes = [helper.make_node("Identity", ["input_ids"], ["logits"])]
    graph = other_graph(tmp_path / "other.onnx", nodes, inputs, [("logits", TensorProto.INT64, ["b", "t"])])
    with pytest.raises(ValueError, match=r"other\.onnx: graph outputs are \['logits'\], expected \['start_logits', "):
        OnnxRunner(graph)


def test_runner_rejects_inputs_it_cannot_feed(tmp_path):
    """A graph exported with fixed shapes (1 x 384, say) or int32 inputs: refused when loaded, naming the input,
    not an onnxruntime error on the first batch."""
    from onnx import TensorProto, helper

    for dtype, shape, named in ((TensorProto.INT64, [1, 384], r"int64\) of shape \[1, 384\]"),
                                (TensorProto.INT32, ["b", "t"], r"int32\) of shape \[b, t\]")):  # fmt: skip
        nodes = [helper.make_node("Identity", [src], [dst]) for src, dst in zip(export.INPUTS, export.OUTPUTS)]
        graph = other_graph(tmp_path / "other.onnx", nodes, [(name, dtype, shape) for name in export.INPUTS],
                            [(name, dtype, shape) for name in export.OUTPUTS])  # fmt: skip
        with pytest.raises(ValueError, match=r"other\.onnx: graph input input_ids is tensor\(" + named):
            OnnxRunner(graph)


def test_runner_rejects_outputs_that_are_not_logits(tmp_path):
    """Logits that are integers, or one number a window: refused when loaded, naming the output (they failed in
    the first batch's layout with an AxisError that named no file)."""
    from onnx import TensorProto, helper

    inputs = [(name, TensorProto.INT64, ["b", "t"]) for name in export.INPUTS]
    for dtype, shape, nodes, named in (
        (TensorProto.INT64, ["b", "t"], [helper.make_node("Identity", ["input_ids"], [o]) for o in export.OUTPUTS],
         r"tensor\(int64\) of shape \[b, t\]"),
        (TensorProto.FLOAT, ["b"], [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT)]
         + [helper.make_node("ReduceMean", ["f"], [o], axes=[1], keepdims=0) for o in export.OUTPUTS],
         r"tensor\(float\) of shape \[b\]"),
    ):  # fmt: skip
        graph = other_graph(tmp_path / "other.onnx", nodes, inputs, [(name, dtype, shape) for name in export.OUTPUTS])
        with pytest.raises(ValueError, match=r"other\.onnx: graph output start_logits is " + named):
            OnnxRunner(graph)


def test_a_graph_onnxruntime_cannot_load_is_named_by_the_output(tiny_dir, tmp_path, monkeypatch):
    """Not by the scratch file it was written to, which is gone by then."""

    def refuse(path, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : opset 99 is not supported")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    out = tmp_path / "model.onnx"
    with pytest.raises(ValueError) as e:
        export_onnx(tiny_dir, out, verbose=False, **WINDOWS)
    assert str(e.value).startswith(f"export onnx: onnxruntime cannot run the graph written for {out} (opset ")
    assert "not a loadable ONNX graph ([ONNXRuntimeError]" in str(e.value) and ".onnx-export" not in str(e.value)
    assert str(e.value).endswith(f"; {out} not written") and list(tmp_path.iterdir()) == []


def test_an_int8_graph_with_non_finite_logits_is_not_written(reuse_trace, tiny_dir, tmp_path, monkeypatch):
    real, reports = export.compare, []

    def compare(*args):
        reports.append(real(*args))
        if len(reports) == 2:  # the int8 graph's, as from a graph whose logits overflow
            reports[-1]["max_abs_diff"] = float("nan")
        return reports[-1]

    monkeypatch.setattr(export, "compare", compare)
    with pytest.raises(
        NonFiniteLogits, match=r"^export onnx: the int8 graph's logits are NaN .*int8\.onnx not written$"
    ):
        export_onnx(tiny_dir, tmp_path / "int8.onnx", int8=True, verbose=False, **WINDOWS)
    assert len(reports) == 2 and list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without bertqa[onnx] looks like
    with pytest.raises(
        ValueError, match=r"^export onnx needs onnx, onnxruntime and onnxscript: pip install 'bertqa\[onnx\]'"
    ):
        export_onnx(tiny_dir, tmp_path / "model.onnx", verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_export_command(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "m.onnx"
    run = [
        sys.executable,
        "-m",
        "bertqa",
        "export",
        "onnx",
        "--model",
        str(tiny_dir),
        "--max-seq-length",
        "128",
        "--doc-stride",
        "32",
    ]
    r = subprocess.run([*run, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.is_file() and report["max_abs_diff"] <= 1e-4 and "max |onnxruntime - pytorch|" in r.stdout
    r = subprocess.run([*run, "--output", str(tmp_path / "m.txt")], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "must end in .onnx" in lines[0]


def test_a_window_longer_than_the_position_table_or_nan_parity_is_refused(reuse_trace, tiny_dir, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """(mutation review) --max-seq-length past the model's positions is named (it was an internal IndexError);
    a NaN difference from PyTorch is a failed check, not a pass."""
    with pytest.raises(ValueError, match=r"--max-seq-length 600 exceeds the model's 512 position embeddings"):
        export_onnx(tiny_dir, tmp_path / "model.onnx", verbose=False, **{**WINDOWS, "max_seq_length": 600})
    real = export.compare

    def compare(*args):
        return {**real(*args), "max_abs_diff": float("nan")}

    monkeypatch.setattr(export, "compare", compare)
    with pytest.raises(
        ValueError, match=r"^export onnx: the graph's logits differ from PyTorch's by nan .*not written$"
    ):
        export_onnx(tiny_dir, tmp_path / "model.onnx", verbose=False, **WINDOWS)
    assert list(tmp_path.iterdir()) == []
