"""`bertqa export onnx`: a fine-tuned QA checkpoint -> one ONNX graph, checked against PyTorch on real windows.

The graph takes `input_ids`, `token_type_ids`, `attention_mask` (int64, (batch, seq)) and returns
`start_logits`, `end_logits` (float32, (batch, seq)); batch and sequence length are free. It is traced by
the `torch.export`-based exporter (`dynamo=True`): on torch 2.13 the legacy TorchScript exporter produced
graphs whose logits were off by ~0.1 even at the traced shape, while this one matches to ~1e-7. The weights
are kept inside the one .onnx file, which protobuf caps at 2 GB: enough for BERT-large (1.3 GB in fp32).

`--int8` stores onnxruntime's dynamic quantisation of that graph: int8 weights (a scale per column),
activations quantised on the fly per batch. It is checked for how far its logits and answer positions move,
not held to fp32 parity.

onnx and onnxruntime are the optional extra `bertqa[onnx]`, imported only when used.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, print_load_notes
from .config import check_seq_len
from .files import (
    atomic_path,
    check_not_claimed,
    check_output,
    first_line,
    not_a_file,
    note,
    read_one_version,
    scratch_dir,
    utf8_name,
)
from .inference import NonFiniteLogits, batched_logits
from .squad.data import Example, load_json, parse_squad
from .squad.features import Features, check_window_params, featurize
from .tokenizer import load_tokenizer

INPUTS = ("input_ids", "token_type_ids", "attention_mask")
OUTPUTS = ("start_logits", "end_logits")
MAX_POSITIONS = "bertqa.max_position_embeddings"  # the graph's metadata: the longest window it runs
FP32_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| over real positions, fp32 (issue 8)
MIN_OPSET = 17  # the first with LayerNormalization, which the exporter writes BERT's layer norms as
CHECK_WINDOWS = 16  # windows taken from --check-file: enough lengths to exercise padding, quick to run
# Both attention paths export and match PyTorch to ~1e-7; the eager graph has fewer reshapes and ran 8-12%
# faster in onnxruntime (MiniLM-L6 fine-tuned, 384-token windows, 2 threads, AMD EPYC with AVX-512).
ATTENTION = "eager"
# A single-file ONNX graph is one protobuf message, which cannot exceed 2 GiB; keep room for the graph.
MAX_INLINE_BYTES = 2**31 - 2**26

# Built-in parity windows when no --check-file is given: contexts of different lengths, and one (all the
# contexts in a row, three times) long enough to need several windows at 384 / 128.
SAMPLES = [
    (
        "When was the bridge opened?",
        "The old stone bridge over the river was opened in 1842, after nine years of work by a crew of masons "
        "who came from the hills to the north. It replaced a wooden ferry landing.",
    ),
    (
        "What does a doc stride control?",
        "Contexts longer than the model's window are cut into overlapping windows. The doc stride is the "
        "number of tokens between the starts of two neighbouring windows, so a smaller stride gives more "
        "overlap and more windows. Each token is scored in the window where it has the most context on "
        "both sides, which is why answers near a window's edge are still found.",
    ),
    (
        "Who kept the lighthouse?",
        "For forty years the lighthouse on the northern cape was kept by Marta Olsen, who trimmed the wick, "
        "wound the clockwork that turned the lens, and logged every ship that passed. Her records, kept in "
        "twelve leather books, are now in the town museum, where visitors can read how storms, fog and the "
        "first steam ships changed the harbour over four decades. When the light was electrified in 1921 "
        "she stayed on for two more winters to teach the new keeper the tides.",
    ),
]


def _onnxruntime():
    """The onnxruntime module (onnx and onnxscript checked too: quantisation and the exporter need them), or a
    one-line error saying how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"export onnx needs onnx, onnxruntime and onnxscript: pip install 'bertqa[onnx]' ({e})"
        ) from None
    return onnxruntime


class _Logits(torch.nn.Module):
    """The model with the graph's interface: three inputs, always a mask, two outputs (no loss)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        out = self.model(input_ids, token_type_ids, attention_mask)
        return out.start_logits, out.end_logits


def _export_graph(model, path: Path, opset: int | None, pad_id: int) -> int:
    """Trace `model` with free batch and sequence axes, write it to `path` as one self-contained file and
    return its opset."""
    wrapper = _Logits(model).eval()
    # A (2, 16) example: torch.export specialises axes of size 0 or 1, and the parity check then runs other
    # shapes, which shows the axes really are free.
    ids = torch.full((2, 16), pad_id, dtype=torch.long)
    ids[:, :12] = torch.arange(1000, 1012)
    types = torch.zeros_like(ids)
    types[:, 6:12] = 1
    mask = (ids != pad_id).long()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {name: {0: batch, 1: seq} for name in INPUTS}
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        # The exporter warns about things that do not concern a user of this command (torchvision ops
        # missing, axis renames); its failures still raise.
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                (ids, types, mask),
                dynamo=True,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes=axes,
                opset_version=opset,
                verbose=False,
            )
            got = program.model.opset_imports[""]
            # The exporter writes its own opset, then converts; where that fails it keeps its own, and says so
            # only in a log.
            if opset is not None and got != opset:
                raise ValueError(f"--opset {opset}: the exporter could not convert the graph to it (it stays at "
                                 f"opset {got}); nothing exported")  # fmt: skip
            # The free sequence axis runs any length, but the position table stops at this: a runner checks it.
            program.model.metadata_props[MAX_POSITIONS] = str(model.config.max_position_embeddings)
            program.save(str(path), external_data=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return got


def _quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # int8 weights with uint8 activations (u8s8), the combination onnxruntime's CPU kernels are fastest on.
    # One scale per weight column, not per matrix: on dev-a.json with a fine-tuned MiniLM-L6 per-tensor
    # scales cost 1.8 F1, per-column ones none (+0.3), for ~6% of the int8 speed.
    # quantize_dynamic logs a hint about pre-processing on the root logger; the graph is already optimised
    # by the exporter, so the hint is noise here. Logged with logging.warning, which gives a root logger without
    # handlers one of its own (logging.basicConfig), at every call: taken away again, so that a library caller's
    # own basicConfig still works and a log line is not printed twice.
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.ERROR)
    try:
        # (it writes a copy beside a path it is given, and its shape inference opens UTF-8 paths only)
        graph = str(src) if utf8_name(src) else onnx.load(str(src))
        try:
            quantize_dynamic(graph, str(dst), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as e:
            # Its copy (about the graph's size) is written by onnx's C++, which does not say when the disk is full:
            # the copy is read back cut short, a protobuf DecodeError.
            beside = src.parent if isinstance(graph, str) else Path(tempfile.gettempdir())
            if not isinstance(e, OSError) and shutil.disk_usage(beside).free < src.stat().st_size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst)) from e
            raise
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _array_batch(features: Features, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `idx` as the graph's int64 inputs, trimmed to their longest real window (dynamic padding)."""
    T = int(features.lengths[idx].max())
    return {
        "input_ids": features.input_ids[idx, :T].astype(np.int64),
        "token_type_ids": features.token_type_ids[idx, :T].astype(np.int64),
        "attention_mask": (np.arange(T) < features.lengths[idx, None]).astype(np.int64),
    }


class OnnxRunner:
    """An exported QA graph run by onnxruntime: the ONNX counterpart of `bertqa.inference.predict_logits`."""

    def __init__(self, path, threads: int | None = None, providers=None):
        ort = _onnxruntime()
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be a positive integer (0 or None: onnxruntime's default), got {threads!r}")
        options = ort.SessionOptions()
        options.log_severity_level = 4  # (its errors come back as exceptions: not also as a line of its own)
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            graph = str(path) if utf8_name(path) else Path(path).read_bytes()  # (it opens UTF-8 paths only)
            self.session = ort.InferenceSession(graph, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            if Path(path).is_dir():
                raise ValueError(f"{path}: is a folder, not an ONNX file") from None
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such ONNX file") from None
            raise ValueError(f"{path}: not a loadable ONNX graph ({first_line(e)})") from None
        names = tuple(i.name for i in self.session.get_inputs())
        if sorted(names) != sorted(INPUTS):
            raise ValueError(f"{path}: graph inputs are {list(names)}, expected {list(INPUTS)}")
        for i in self.session.get_inputs():  # what predict_logits feeds: int64 batches of any size and length
            if i.type != "tensor(int64)" or len(i.shape) != 2 or any(isinstance(d, int) for d in i.shape):
                shape = ", ".join("?" if d is None else str(d) for d in i.shape)
                raise ValueError(f"{path}: graph input {i.name} is {i.type} of shape [{shape}]; bertqa feeds int64 "
                                 "(batch, sequence) with both axes free, as `bertqa export onnx` writes")  # fmt: skip
        names = tuple(o.name for o in self.session.get_outputs())
        if not set(OUTPUTS) <= set(names):
            raise ValueError(f"{path}: graph outputs are {list(names)}, expected {list(OUTPUTS)}")
        for o in self.session.get_outputs():  # what batched_logits takes: float (batch, sequence)
            if o.name in OUTPUTS and (o.type != "tensor(float)" or len(o.shape) != 2):
                shape = ", ".join("?" if d is None else str(d) for d in o.shape)
                raise ValueError(f"{path}: graph output {o.name} is {o.type} of shape [{shape}]; bertqa reads float "
                                 "(batch, sequence) logits, as `bertqa export onnx` writes")  # fmt: skip
        self.path = Path(path)
        positions = self.session.get_modelmeta().custom_metadata_map.get(MAX_POSITIONS, "")
        self.max_positions = int(positions) if positions.isdecimal() else None  # (None: a graph exported before)

    def __call__(self, input_ids, token_type_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits, float32 (batch, seq), for int64 (batch, seq) arrays."""
        length = np.shape(input_ids)[-1] if np.ndim(input_ids) else 0
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(f"{self.path}: a batch of {length} tokens is longer than the graph's "
                             f"{self.max_positions} positions (its model's max_position_embeddings)")  # fmt: skip
        feed = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        try:
            start, end = self.session.run(list(OUTPUTS), feed)
        except Exception as e:  # onnxruntime's own exception types; e.g. windows longer than the position table
            shape = " x ".join(map(str, getattr(input_ids, "shape", ())))
            raise ValueError(
                f"{self.path}: onnxruntime cannot run a batch of {shape} tokens ({first_line(e)})"
            ) from None
        return start, end

    def predict_logits(self, features: Features, indices=None, batch_size: int = 32):
        """Start and end logits (len(indices), L) float32, laid out as `predict_logits` lays them out (the same
        `batched_logits`)."""
        indices = np.arange(len(features)) if indices is None else indices
        return batched_logits(features, indices, batch_size, lambda rows: self(**_array_batch(features, rows)))


def check_examples(check_file=None, limit: int = CHECK_WINDOWS) -> list[Example]:
    """The questions to compare the graph on: the first `limit` of `check_file` (a SQuAD JSON), else the
    built-in question/context pairs (one of them several windows long)."""
    if check_file is None:
        long = " ".join(context for _, context in SAMPLES)
        pairs = [*SAMPLES, ("Who kept the lighthouse?", " ".join([long] * 3))]
        return [Example(f"sample-{i}", q, c, [], []) for i, (q, c) in enumerate(pairs)]
    if not os.fspath(check_file):  # ("" is the current folder to Path)
        raise ValueError("--check-file '': empty; name a SQuAD JSON file, or leave the flag out")
    if Path(check_file).is_dir():
        raise ValueError(f"--check-file {check_file}: is a folder, not a SQuAD JSON file")
    if not Path(check_file).is_file():
        raise not_a_file(f"--check-file {check_file}", check_file)
    # Answers are not needed to compare logits: a file to predict on (none given) will do.
    examples = parse_squad(load_json(check_file), check_file, False, require_answers=False)[:limit]
    if not examples:
        raise ValueError(f"--check-file {check_file}: no questions to check the graph on")
    return examples


def check_windows(tokenizer, check_file=None, max_seq_length: int = 384, doc_stride: int = 128,
                  max_query_length: int = 64, limit: int = CHECK_WINDOWS) -> Features:  # fmt: skip
    """Real windows to compare the graph on: the first `limit` windows of `check_file`'s questions (a SQuAD JSON,
    or the list `check_examples` read from it), else of the built-in ones."""
    examples = check_file if isinstance(check_file, list) else check_examples(check_file, limit)
    features = featurize(examples, tokenizer, max_seq_length, doc_stride, max_query_length)
    return features.select(np.arange(min(limit, len(features))))


def _runner(graph: Path, output: Path, opset: int) -> OnnxRunner:
    """OnnxRunner on a graph just written in the scratch folder, its errors naming the output instead (the
    scratch folder is gone by the time they are read)."""
    try:
        return OnnxRunner(graph)
    except ValueError as e:
        reason = str(e).removeprefix(f"{graph}: ")
        raise ValueError(f"export onnx: onnxruntime cannot run the graph written for {output} (opset {opset}): "
                         f"{reason}; {output} not written") from None  # fmt: skip


@torch.inference_mode()
def compare(model, runner: OnnxRunner, features: Features) -> dict:
    """Run every window through PyTorch and onnxruntime, padded together in one batch, and the shortest one
    alone (another batch size and length); compare the logits over real positions only."""
    report, diffs = {"windows": len(features), "shapes": []}, []
    shortest = np.array([int(np.argmin(features.lengths))])
    for rows in (np.arange(len(features)), shortest):
        batch = _array_batch(features, rows)
        mask = batch["attention_mask"].astype(bool)
        out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        ours = (out.start_logits.float().numpy(), out.end_logits.float().numpy())
        if not all(np.isfinite(a[mask]).all() for a in ours):  # finite weights that overflow: the graph is not at fault
            raise NonFiniteLogits("PyTorch's own logits are NaN or infinite on the check windows; nothing exported")
        theirs = runner(**batch)
        diffs += [np.abs(a - b)[mask].max() for a, b in zip(ours, theirs)]
        report["shapes"].append(f"{mask.shape[0]} x {mask.shape[1]}")
        if len(rows) == len(features):
            # The answer positions each side would pick, over real positions only.
            for name, a, b in zip(("start", "end"), ours, theirs):
                a, b = np.where(mask, a, -np.inf), np.where(mask, b, -np.inf)
                report[f"{name}_argmax_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
    report["max_abs_diff"] = float(np.max(diffs))  # np.max, unlike max(), lets a NaN through to fail the check
    return report


def export_onnx(
    model,
    output,
    int8: bool = False,
    check_file=None,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    opset: int | None = None,
    trust_pickle: bool = False,
    config=None,
    verbose: bool = True,
) -> dict:
    """Export the QA checkpoint `model` (anything `load_model` reads) to `output` (.onnx), check it against
    PyTorch on real windows and return a report. fp32 must match to FP32_TOLERANCE, else ValueError and no
    file; `int8` writes the dynamically quantised graph and reports how far it moves. `output` appears
    complete or not at all."""
    say = note if verbose else (lambda *a, **k: None)
    inputs = {"--model": model, "--check-file": check_file}
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():  # (else a preset's name or a BertConfig)
        inputs["--config"] = config
    output = check_output(output, ".onnx", inputs=inputs)
    folder = Path(os.path.realpath(output)).parent  # (where it lands: a link's target)
    check_not_claimed(folder, f"--output {output}")
    check_window_params(max_seq_length, doc_stride, max_query_length, flags=True)
    if not Path(model).exists():
        raise FileNotFoundError(f"--model {model}: no such checkpoint file or folder")
    examples = check_examples(check_file)  # a bad --check-file is refused before the model loads
    if opset is not None and opset < MIN_OPSET:  # before the slow part, as the exporter would only log it
        raise ValueError(f"--opset {opset}: the graph needs opset {MIN_OPSET} or later (LayerNormalization)")
    _onnxruntime()  # fail before the slow part when the extra is missing
    import onnx

    if opset is not None and opset > onnx.defs.onnx_opset_version():  # (the exporter failed inside, a bug's line)
        raise ValueError(f"--opset {opset}: the installed onnx knows opsets up to {onnx.defs.onnx_opset_version()}")
    t0 = time.perf_counter()

    def load():
        net = load_model(model, config, "cpu", trust_pickle, attn_implementation=ATTENTION, verbose=False,
                         require_qa_head=True).float().eval()  # fmt: skip
        return net, load_tokenizer(model, config=net.config)

    net, tokenizer = read_one_version(model, load)
    if verbose:
        print_load_notes(net)
    bad = next((name for name, p in net.state_dict().items() if p.is_floating_point() and not p.isfinite().all()), None)
    if bad is not None:  # every logit would be NaN: nothing worth exporting, and no parity to check
        raise NonFiniteLogits(f"--model {model}: its weight {bad} holds NaN or infinite values; nothing exported")
    nbytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if nbytes > MAX_INLINE_BYTES:
        raise ValueError(
            f"--model {model}: {nbytes / 1e9:.2f} GB of fp32 weights exceed what a single-file ONNX graph holds (2 GB)"
        )
    check_seq_len(max_seq_length, net.config.max_position_embeddings, "--max-seq-length")
    features = check_windows(tokenizer, examples, max_seq_length, doc_stride, max_query_length)

    report = {"path": str(output), "int8": bool(int8), "attention": ATTENTION}
    # The graphs are written in a scratch folder beside the output (which also clears what a killed export left:
    # up to twice the model's size), then renamed into place.
    check_not_claimed(folder, f"--output {output}")  # (one may have started since)
    with scratch_dir(output, "onnx-export") as work, atomic_path(output, within=work) as tmp:
        fp32 = work / "fp32.onnx" if int8 else tmp
        report["opset"] = _export_graph(net, fp32, opset, tokenizer.pad_id)
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        say(f"bertqa: exported {model} -> ONNX opset {report['opset']}, free batch and sequence axes, "
            f"{ATTENTION} attention, in {report['export_seconds']} s")  # fmt: skip
        check = compare(net, _runner(fp32, output, report["opset"]), features)
        where = f"{check['windows']} windows (batches {' and '.join(check['shapes'])})"
        say(f"bertqa: fp32 parity on {where}: max |onnxruntime - pytorch| = {check['max_abs_diff']:.2e} "
            f"(limit {FP32_TOLERANCE:.0e})")  # fmt: skip
        if not check["max_abs_diff"] <= FP32_TOLERANCE:  # also catches NaN
            raise ValueError(
                f"export onnx: the graph's logits differ from PyTorch's by {check['max_abs_diff']:.2e} "
                f"(> {FP32_TOLERANCE:.0e}); {output} not written"
            )
        report.update(windows=check["windows"], shapes=check["shapes"], max_abs_diff=check["max_abs_diff"])
        if int8:
            report["fp32_size_bytes"] = fp32.stat().st_size
            report["fp32_max_abs_diff"] = check["max_abs_diff"]
            _quantize(fp32, tmp)
            check = compare(net, _runner(tmp, output, report["opset"]), features)
            if not np.isfinite(check["max_abs_diff"]):  # int8 is held to no bound but this one
                raise NonFiniteLogits(f"export onnx: the int8 graph's logits are NaN or infinite; {output} not written")
            report.update({k: check[k] for k in ("max_abs_diff", "start_argmax_agreement", "end_argmax_agreement")})
            say(f"bertqa: int8 (dynamic quantisation, per-column int8 weights) on the same windows: max |onnxruntime - "
                f"pytorch| = {check['max_abs_diff']:.3f}; the answer start / end positions agree on "
                f"{check['start_argmax_agreement']:.0%} / {check['end_argmax_agreement']:.0%} of windows")  # fmt: skip
        report["size_bytes"] = tmp.stat().st_size
    extra = f", {report['fp32_size_bytes'] / report['size_bytes']:.1f}x smaller than fp32" if int8 else ""
    say(f"bertqa: wrote {output} ({report['size_bytes'] / 1e6:.1f} MB{extra})")
    say(json.dumps(report))
    return report
