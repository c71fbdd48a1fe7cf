"""bertqa against transformers on one device, in every precision it offers: the same random BERT weights and
padded windows, with the padding mask and without one (where SDPA may take its flash kernel), forward logits and
one training step's loss and gradients (dropout off, so both compute the same thing). Prints one line per check
and exits non-zero if any differs by more than its precision allows. Made for a session lent a GPU
(scripts/gpu_check.sh); on a CPU it checks fp32 and bf16 (emulated, slowly, where the CPU has no native bf16).

    python benchmarks/gpu_parity.py --device cuda
"""

from __future__ import annotations

import argparse

import torch
from _common import run

from bertqa.bench import hf_model
from bertqa.config import BertConfig
from bertqa.distributed import resolve_device
from bertqa.model import BertForQuestionAnswering
from bertqa.runtime import Precision

# Largest difference allowed, relative to the largest magnitude of transformers' value.
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2, "bf16": 6e-2}


def pair(device, seed=0):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
               max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    ours = BertForQuestionAnswering(BertConfig(**cfg))
    hf = hf_model(ours.config, ours.state_dict())  # transformers' model (SDPA) holding the same weights
    return hf.to(device), ours.to(device)


def windows(device, B=8, T=160, masked=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (B, T), generator=g)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g) if masked else torch.full((B,), T)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    types = (torch.arange(T)[None, :] >= T // 4).long() * mask
    starts = torch.randint(0, T // 3, (B,), generator=g)
    return [t.to(device) for t in (ids * mask, types, mask, starts, starts + 3)]


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check(device, precision: Precision, masked: bool) -> list[tuple[str, float]]:
    hf, ours = pair(device)
    ids, types, mask, starts, ends = windows(device, masked=masked)
    m = mask if masked else None
    results = []
    with precision.scope():
        hf.eval()
        ours.eval()
        with torch.no_grad(), precision.autocast():
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=m)
            out = ours(ids, types, m)
        keep = mask.bool()
        results.append(("start logits", rel(out.start_logits[keep], ref.start_logits[keep])))
        results.append(("end logits", rel(out.end_logits[keep], ref.end_logits[keep])))
        hf.train()
        ours.train()
        with precision.autocast():
            ref = hf(input_ids=ids, token_type_ids=types, attention_mask=m, start_positions=starts, end_positions=ends)
            out = ours(ids, types, m, starts, ends)
        # fp16 trains with a loss scale (train.py's GradScaler starts at 2**16): without it the attention weights'
        # small gradients fall below fp16's normal range and each kernel rounds them its own way.
        scale = 2.0**16 if precision.name == "fp16" else 1.0
        (ref.loss * scale).backward()
        (out.loss * scale).backward()
    results.append(("training loss", rel(out.loss.detach(), ref.loss.detach())))
    # Per tensor, against its own scale, or a hundredth of the largest gradient's where its own is smaller: some
    # gradients are zero but for rounding (the QA bias, the key biases: softmax ignores a constant shift).
    theirs = {n: p.grad.float() / scale for n, p in hf.named_parameters() if p.grad is not None}
    floor = 1e-2 * max(float(g.abs().max()) for g in theirs.values())
    worst = max((float((p.grad.float() / scale - theirs[n]).abs().max()) / max(float(theirs[n].abs().max()), floor), n)
                for n, p in ours.named_parameters() if n in theirs)  # fmt: skip
    results.append((f"gradients (worst: {worst[1]})", worst[0]))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)  # one that cannot run: one line, not a traceback from deep inside
    names = ["fp32", "bf16"] + (["tf32", "fp16"] if device.type == "cuda" else [])
    failed = 0
    for name in names:
        precision = Precision.resolve(name, device)
        for masked in (True, False):
            for what, err in check(device, precision, masked):
                ok = err <= TOLERANCE[name]
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name:4s} {'padded' if masked else 'unpadded'}  {what}: "
                      f"{err:.2e} (allowed {TOLERANCE[name]:.0e})", flush=True)  # fmt: skip
    print(f"gpu_parity: {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} "
          f"torch {torch.__version__}: {failed} failed")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
