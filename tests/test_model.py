"""The model against `transformers` (the reference implementation), fp32."""

import copy
import itertools

import pytest
import torch
from skips import PLATFORM

from bertqa.config import BertConfig
from bertqa.model import BertForQuestionAnswering, _fused_linear_works

transformers = pytest.importorskip("transformers")


def hf_pair(hidden_act, seed=0, attn="eager", **config):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=101,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        max_position_embeddings=64,
        hidden_act=hidden_act,
        **config,
    )
    hf = transformers.BertForQuestionAnswering(transformers.BertConfig(**cfg)).eval()
    ours = BertForQuestionAnswering(BertConfig(**cfg), attn_implementation=attn).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # HF keys load with no renaming
    return hf, ours


def padded_batch(seed=1, B=4, T=20, vocab=101):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, T - 3, 7, 12])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    types = (torch.arange(T)[None, :] >= 5).long() * mask
    return ids * mask, types, mask


def answer_spans():
    """Start and end positions for padded_batch's four windows, inside their real tokens."""
    return torch.tensor([5, 6, 5, 8]), torch.tensor([7, 9, 6, 10])


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "blocked"])
def test_parity_with_transformers_on_padded_batch(hidden_act, attn):
    hf, ours = hf_pair(hidden_act, attn=attn)
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        ref_h = hf.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        out = ours(ids, types, mask)
        h = ours.bert(ids, types, mask)
    keep = mask.bool()
    assert h.shape == ref_h.shape == (4, 20, 48)
    assert (h - ref_h).abs()[keep].max() < 1e-4
    assert (out.start_logits - ref.start_logits).abs()[keep].max() < 1e-4
    assert (out.end_logits - ref.end_logits).abs()[keep].max() < 1e-4
    assert out.loss is None


@pytest.mark.parametrize("attn", ["sdpa", "eager", "blocked", "auto"])
def test_training_gradients_match_transformers(attn):
    """In training mode (dropout off, so both compute the same thing) the loss and every gradient agree: the
    written-out paths auto picks on a CPU are as exact as SDPA."""
    # No dropout, set in the configs: transformers before 5 takes the attention's from the config, not a module.
    hf, ours = hf_pair("gelu", attn=attn, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf.train()
    ours.train()
    ids, types, mask = padded_batch()
    starts, ends = answer_spans()
    ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, start_positions=starts, end_positions=ends)
    out = ours(ids, types, mask, starts, ends)
    ref.loss.backward()
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    ref_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - ref_grads[name].grad).abs().max() < 1e-4, name


def test_gelu_forms_differ():
    # Guards the parity test above: if both names mapped to one function it would still pass.
    _, erf = hf_pair("gelu")
    _, tanh = hf_pair("gelu_new")
    ids, types, mask = padded_batch()
    with torch.no_grad():
        assert (erf.bert(ids, types, mask) - tanh.bert(ids, types, mask)).abs().max() > 1e-6


def test_eager_blocked_and_sdpa_agree_and_mask_matters():
    _, ours = hf_pair("gelu")
    ids, types, mask = padded_batch()
    with torch.no_grad():
        ours.set_attention("sdpa")
        sdpa = ours.bert(ids, types, mask)
        ours.set_attention("blocked")
        blocked = ours.bert(ids, types, mask)
        ours.set_attention("eager")
        eager = ours.bert(ids, types, mask)
        unmasked = ours.bert(ids, types, None)
    keep = mask.bool()
    assert (sdpa - eager).abs()[keep].max() < 1e-5
    assert (blocked - eager).abs()[keep].max() < 1e-5
    assert (unmasked - eager)[1].abs().max() > 1e-3  # row 1 is padded: the mask changes its outputs


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("keep_probs", [True, False])
def test_blocked_attention_gradients_across_blocks(monkeypatch, masked, keep_probs):
    """float64 gradcheck of the blocked attention with blocks of a few heads (the last one short), keeping the
    probabilities for the backward pass or recomputing them, and its no-grad path (one reused scratch block)."""
    import bertqa.model as model

    T = 5
    monkeypatch.setattr(model, "BLOCK_BYTES", 3 * T * T * 8 // torch.get_num_threads())  # 3 of the 8 heads per block
    monkeypatch.setattr(model, "KEEP_PROBS_MAX_LEN", T if keep_probs else T - 1)
    assert len(model._blocks(8, T, 8)) >= 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :] if masked else None
    assert torch.autograd.gradcheck(lambda q, k, v: model.blocked_attention(q, k, v, mask, 0.0), (q, k, v))
    ref = model.eager_attention(q, k, v, mask, 0.0)
    with torch.no_grad():
        assert torch.allclose(model.blocked_attention(q, k, v, mask, 0.0), ref, atol=1e-12)
    assert torch.allclose(model.blocked_attention(q, k, v, mask, 0.0), ref, atol=1e-12)


@pytest.mark.parametrize("keep_probs", [True, False])
def test_blocked_attention_with_dropout_is_the_written_out_form_with_the_same_mask(monkeypatch, keep_probs):
    """Dropout on the attention probabilities in the blocked attention: the seed draws the mask the written-out form
    draws (BitDropout's, of the same (B, nh, T, T) probabilities), so the outputs and gradients are its to rounding,
    across blocks of heads, with the probabilities kept or recomputed for the backward pass; a float64 gradcheck
    with the mask fixed by the seed."""
    import bertqa.model as model

    T = 21
    monkeypatch.setattr(model, "BLOCK_BYTES", 3 * T * T * 8 // torch.get_num_threads())  # 3 of the 8 heads per block
    monkeypatch.setattr(model, "KEEP_PROBS_MAX_LEN", T if keep_probs else T - 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = (torch.arange(T) < torch.tensor([[15], [T]]))[:, None, None, :]
    grad = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64)

    def run(fn, p, seed=5):
        torch.manual_seed(seed)
        y = fn(q, k, v, mask, p)
        return (y, *torch.autograd.grad(y, (q, k, v), grad))

    blocked, eager = run(model.blocked_attention, 0.1), run(model.eager_attention, 0.1)
    assert type(blocked[0].grad_fn).__name__ == "BlockedAttentionBackward"  # not a fallback to the written-out form
    for a, b in zip(blocked, eager):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for other in (run(model.blocked_attention, 0.0), run(model.blocked_attention, 0.1, seed=6)):
        assert (other[0] - blocked[0]).abs().max() > 1e-3  # the dropout drops, and the seed decides what
    torch.manual_seed(5)
    with torch.no_grad():  # no backward pass: the same forward
        torch.testing.assert_close(model.blocked_attention(q, k, v, mask, 0.1), blocked[0], atol=1e-12, rtol=0)

    T = 6  # the gradcheck on fewer positions, alike: 3 heads a block, the probabilities kept or recomputed
    monkeypatch.setattr(model, "BLOCK_BYTES", 3 * T * T * 8 // torch.get_num_threads())
    monkeypatch.setattr(model, "KEEP_PROBS_MAX_LEN", T if keep_probs else T - 1)

    def seeded(q, k, v):
        torch.manual_seed(7)
        return model.blocked_attention(q, k, v, mask[..., :T], 0.3)

    assert torch.autograd.gradcheck(seeded, [t[:, :, :T, :3].detach().requires_grad_() for t in (q, k, v)])


def test_blocked_attention_bf16_softmax_in_fp32_scratch(monkeypatch):
    """bf16 scores are soft-maxed in an fp32 scratch block and copied back: forward and both backward paths
    (kept and recomputed probabilities) agree with fp32 arithmetic on the same bf16 inputs, to bf16 rounding."""
    import bertqa.model as model

    T = 24
    monkeypatch.setattr(model, "BLOCK_BYTES", 3 * T * T * 2 // torch.get_num_threads())  # 3 of the 8 heads per block
    assert model._softmax_scratch(model._blocks(8, T, 2), T, torch.ones(1, dtype=torch.bfloat16)) is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 8, generator=g).bfloat16() for _ in range(3))
    mask = (torch.arange(T) < torch.tensor([[T - 7], [T]]))[:, None, None, :]
    grad = torch.randn(2, 4, T, 8, generator=g).bfloat16()
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    out_ref = model.eager_attention(*ref, mask, 0.0)
    out_ref.backward(grad.float())
    # The outputs cannot tell (torch's bf16 softmax computes in fp32 too): what the softmax is given is recorded.
    softmax, given = torch._softmax, []
    monkeypatch.setattr(torch, "_softmax", lambda x, *a, **kw: given.append(x.dtype) or softmax(x, *a, **kw))
    for keep in (True, False):
        monkeypatch.setattr(model, "KEEP_PROBS_MAX_LEN", T if keep else T - 1)
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        out = model.blocked_attention(*ours, mask, 0.0)
        assert given == [torch.float32] * 3  # the forward pass's three blocks
        out.backward(grad)
        assert given == [torch.float32] * (3 if keep else 6)  # probabilities recomputed: three more
        given.clear()
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), out_ref, atol=2e-2, rtol=2e-2)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        torch.testing.assert_close(model.blocked_attention(q, k, v, mask, 0.0).float(), out_ref, atol=2e-2, rtol=2e-2)
    assert given == [torch.float32] * 3


def score_widths(monkeypatch) -> list[int]:
    """The width (keys) of the scores each block of the blocked attention soft-maxes, appended as it runs."""
    import bertqa.model as model

    probs, widths = model._probs, []
    monkeypatch.setattr(model, "_probs", lambda *a, **kw: widths.append(a[5].size(-1)) or probs(*a, **kw))
    return widths


@pytest.mark.parametrize("T", [17, 24, 32])
@pytest.mark.parametrize("masked", [True, False])
def test_blocked_attention_inference_pads_keys_to_16_without_changing_the_output(T, masked, monkeypatch):
    """Without autograd the keys are padded to a multiple of 16 (zero K and V, the lowest bias): the output is
    that of the unpadded autograd path and of the written-out form, with or without a padding mask; the
    padded keys would take weight if they were not masked."""
    import bertqa.model as model

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, 4, T, 8, generator=g) for _ in range(3))
    mask = (torch.arange(T) < torch.tensor([[T - 5], [T], [3]]))[:, None, None, :] if masked else None
    keys = score_widths(monkeypatch)
    with torch.no_grad():
        padded = model.blocked_attention(q, k, v, mask, 0.0)
        eager = model.eager_attention(q, k, v, mask, 0.0)
    assert set(keys) == {-(-T // 16) * 16}
    keys.clear()
    unpadded = model.blocked_attention(*(t.clone().requires_grad_() for t in (q, k, v)), mask, 0.0).detach()
    assert set(keys) == {T}  # with autograd, not padded
    torch.testing.assert_close(padded, unpadded, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=0)
    with torch.no_grad():  # the same keys, padded by hand but given a score of 0: they dilute the weights
        Tp = -(-T // 16) * 16
        zk, zv = (torch.cat([t, t.new_zeros(3, 4, Tp - T, 8)], dim=2) for t in (k, v))
        leaky = torch.cat([mask, torch.ones(3, 1, 1, Tp - T, dtype=torch.bool)], -1) if masked else None
        if Tp > T:
            assert (model.eager_attention(q, zk, zv, leaky, 0.0) - padded).abs().max() > 1e-3


# oneDNN's bf16 linear needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU its weight reorder refuses
# bf16, and bertqa keeps F.linear there (as in a torch built without oneDNN).
needs_fused_linear = pytest.mark.skipif(
    not _fused_linear_works(), reason=PLATFORM + "oneDNN's bf16 linear does not run here (no AVX-512 or no oneDNN)"
)


def test_the_fused_linear_runs_wherever_the_cpu_can_run_it():
    """The probe behind needs_fused_linear: a broken one would skip those tests on every CPU, and turn the fused
    path off for every user."""
    from bertqa.runtime import cpu_features

    features = cpu_features()
    if not features or not torch.backends.mkldnn.is_available():
        pytest.skip(PLATFORM + "this torch cannot tell the CPU's features, or has no oneDNN")
    avx512 = all(features.get(name) for name in ("avx512_bw", "avx512_vl", "avx512_dq"))
    assert _fused_linear_works() == (avx512 or bool(features.get("avx_ne_convert"))), features


@pytest.mark.parametrize("T", [5, 16, 21])
def test_a_row_with_every_key_masked_attends_to_its_keys_alike_as_transformers(T, monkeypatch):
    # transformers' additive mask gives every key of such a row the same lowest score: the mean of its values.
    # The keys padded in CPU inference must not join that mean.
    import bertqa.model as model

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
    mask = torch.stack([torch.zeros(T, dtype=torch.bool), torch.arange(T) < 4])[:, None, None, :]
    keys = score_widths(monkeypatch)
    with torch.no_grad():
        blocked = model.blocked_attention(q, k, v, mask, 0.0)
        eager = model.eager_attention(q, k, v, mask, 0.0)
    assert set(keys) == {16 if T <= 16 else 32}  # (the keys were padded)
    torch.testing.assert_close(blocked[0], v[0].mean(1, keepdim=True).expand(3, T, 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(blocked, eager, atol=1e-6, rtol=0)


def test_sdpa_gradients_of_a_row_with_every_key_masked():
    """(review) SDPA's fused kernels keep a log-sum-exp that loses log(T) beside the padding bias: such a row's
    forward was the mean of its values, but its dv came out T times too large. In training it attends to every key
    with equal scores instead: the same mean and dv, the other rows' gradients unchanged, and none for its q and k
    (the exact gradients of a mean; the written-out form's are those of a softmax the bias swallowed)."""
    import bertqa.model as model

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.stack([torch.arange(20) < 15, torch.zeros(20, dtype=torch.bool)])[:, None, None, :]
    w = torch.randn(2, 2, 20, 8, generator=g)
    got = {}
    for form in ("eager", "sdpa"):
        out = model.ATTENTION[form](q, k, v, mask, 0.0)
        got[form] = (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))
    (out, dq, dk, dv), (ref, ref_dq, ref_dk, ref_dv) = got["sdpa"], got["eager"]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(dv, ref_dv, atol=1e-5, rtol=0)  # (was 20 times the eager one for example 1)
    torch.testing.assert_close(dq[0], ref_dq[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dk[0], ref_dk[0], atol=1e-5, rtol=0)
    assert not dq[1].any() and not dk[1].any()


def test_a_fresh_models_padding_row_starts_at_zero_as_in_transformers():
    cfg = BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=80)
    emb = BertForQuestionAnswering(cfg).bert.embeddings.word_embeddings.weight
    assert not emb[cfg.pad_token_id].any() and emb[cfg.pad_token_id + 1].any()


@needs_fused_linear
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu"])
def test_fused_bf16_linear_matches_fp32_arithmetic(activation):
    """In bf16 inference on a CPU a Linear is one oneDNN kernel: on bf16-exact inputs and weights it gives the
    fp32 result (bias and activation applied to the fp32 accumulator) rounded once to bf16. The tolerance is
    tight enough to tell the erf GELU from the tanh one on the small negative outputs."""
    from bertqa.model import ACTIVATIONS, Linear

    torch.manual_seed(0)
    lin = Linear(48, 80, activation)
    with torch.no_grad():
        lin.weight.mul_(3).copy_(lin.weight.bfloat16())  # pre-activations of a few units: enough to reach -2
        lin.bias.copy_(lin.bias.bfloat16())
    x = torch.randn(3, 7, 48).bfloat16().float()
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    if activation is not None:
        exact = ACTIVATIONS[activation][0](exact)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert lin.fused_bf16(x)
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 80) and lin._packed is not None
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-5)
    with torch.no_grad():  # the packed weight follows an in-place update of the weight
        lin.weight.mul_(-1)
        with torch.autocast("cpu", torch.bfloat16):
            flipped = lin(x)
    assert (flipped.float() - y.float()).abs().max() > 0.5
    lin.weight.data.mul_(-1)  # a change torch's version counter does not see: eval() repacks
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(lin.eval()(x), y)
    with torch.inference_mode():  # a layer made there: its weight has no version counter
        made = Linear(48, 80, activation)
        made.load_state_dict(lin.state_dict())
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(made(x), y) and made._packed is not None


@needs_fused_linear
def test_fused_linear_only_in_cpu_bf16_inference(monkeypatch):
    import bertqa.model as model
    from bertqa.model import Linear

    lin, x = Linear(8, 4), torch.randn(2, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert not lin.fused_bf16(x)  # autograd through the weight: F.linear
        with torch.no_grad():
            assert lin.fused_bf16(x)
        with torch.inference_mode():
            assert lin.fused_bf16(x)
    with torch.no_grad():
        assert not lin.fused_bf16(x)  # fp32
        assert lin.fused_bf16(x.bfloat16())  # a bf16 model, no autocast
        assert lin(x).dtype == torch.float32 and lin._packed is None
        monkeypatch.setattr(model, "_fused_linear_works", lambda: False)  # a build without the kernel
        assert not lin.fused_bf16(x.bfloat16())
        with torch.autocast("cpu", torch.bfloat16):
            assert not lin.fused_bf16(x) and lin(x).dtype == torch.bfloat16  # autocast's F.linear


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # forward AD's first use, inside torch
def test_fused_linear_not_under_forward_ad_or_torch_func(monkeypatch):
    """oneDNN's fused kernel has no forward-mode or functorch rules: under no_grad a dual input's tangent was
    dropped (no error, the linear layers' part of the derivative missing), and vmap over parameters raised."""
    import torch.autograd.forward_ad as fwAD

    import bertqa.model as model
    from bertqa.model import Linear

    monkeypatch.setattr(model, "_fused_linear_works", lambda: True)  # the decision alone: any CPU
    lin, x = Linear(8, 4), torch.randn(2, 8, dtype=torch.bfloat16)
    seen = []
    with torch.no_grad():
        seen.append(lin.fused_bf16(x))
        with fwAD.dual_level():
            seen.append(lin.fused_bf16(fwAD.make_dual(x, torch.ones_like(x))))
        torch.func.vmap(lambda row: seen.append(lin.fused_bf16(row)) or row)(x)
    assert seen == [True, False, False]


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
def test_cpu_fp32_inference_writes_every_layers_feed_forward_into_one_tensor(activation, monkeypatch):
    """Its 4C-wide output was a fresh tensor in each layer, and another for the activation: past glibc's mmap
    threshold each was new pages, faulted in on first touch. Now one tensor, activated in place, shared by the
    layers of a forward pass; the logits bit for bit the same. Training, bf16 and torch.func keep their paths."""
    import bertqa.model as model

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     hidden_act=activation)  # fmt: skip
    m = BertForQuestionAnswering(cfg).eval()
    ids, mask = torch.randint(0, 100, (3, 20)), torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0
    storage, forward = [], model.BertIntermediate.forward  # (not a hook: with one the tensor is not shared)
    monkeypatch.setattr(
        model.BertIntermediate, "forward", lambda self, x: storage.append(forward(self, x)) or storage[-1]
    )

    def run(context):
        storage.clear()
        with context():
            out = m(ids, attention_mask=mask)
        return out, len({t.untyped_storage().data_ptr() for t in storage})

    shared, n = run(torch.inference_mode)
    assert n == 1 and run(torch.no_grad)[1] == 1
    assert run(torch.enable_grad)[1] == 3  # autograd keeps each layer's for the backward pass
    assert run(lambda: torch.autocast("cpu", torch.bfloat16))[1] == 3
    monkeypatch.setattr(model.Linear, "into_scratch", lambda self, x: False)
    apart, n = run(torch.inference_mode)
    assert n == 3 and torch.equal(shared.start_logits, apart.start_logits)
    assert torch.equal(shared.end_logits, apart.end_logits)
    monkeypatch.undo()
    monkeypatch.setattr(
        model.BertIntermediate, "forward", lambda self, x: storage.append(forward(self, x)) or storage[-1]
    )
    lin = m.bert.encoder.layer[0].intermediate.dense
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert lin.into_scratch(x) and not lin.into_scratch(x.double()) and not lin.into_scratch(x.bfloat16())
        assert not torch.func.vmap(lambda row: torch.tensor(lin.into_scratch(row)))(x).any()
        assert not m.qa_outputs.into_scratch(x)  # no activation: the span head's output is tiny


def test_the_shared_feed_forward_tensor_leaves_checkpointed_swapped_and_hooked_layers_as_they_were():
    """(review) Reentrant checkpointing runs a wrapped sublayer without autograd on an input that needs a gradient:
    its output was the shared tensor, which the next layer overwrote before the backward pass read it (an error
    there); and a module swapped in for intermediate.dense, or a hook on it, was given the scratch as a second
    argument."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    m = BertForQuestionAnswering(cfg).train()
    ids, positions = torch.randint(0, 100, (3, 20)), torch.tensor([1, 2, 3])
    grads = []
    for reentrant in (False, True):
        m.zero_grad()
        if reentrant:
            for layer in m.bert.encoder.layer:
                layer.intermediate.forward = lambda x, f=layer.intermediate.forward: checkpoint(
                    f, x, use_reentrant=True
                )
        m(ids, start_positions=positions, end_positions=positions + 1).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    for layer in m.bert.encoder.layer:
        del layer.intermediate.forward  # (the class's again)
    m.eval()
    inputs = []
    m.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda mod, args, out: inputs.append(len(args)))
    m.bert.encoder.layer[1].intermediate.dense = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU())
    with torch.inference_mode():
        out = m(ids)
    assert inputs == [1] and torch.isfinite(out.start_logits).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_what_a_forward_hook_keeps_is_not_written_over_without_autograd(precision):
    """(review) Without autograd the residuals took their sums in place and the layers shared one feed-forward
    tensor: a hook keeping the embeddings' output, a layer's, its attention's or its feed-forward's held values
    written over later in the pass. Now neither runs while a hook is registered; the logits are the same. A layer
    run on its own leaves its input as it was."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    m = BertForQuestionAnswering(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    points = {
        "embeddings": m.bert.embeddings,
        "layer 0": m.bert.encoder.layer[0],
        "attention 0": m.bert.encoder.layer[0].attention,
        "intermediate 0": m.bert.encoder.layer[0].intermediate,
    }
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def run(context):
        kept = {}
        handles = [mod.register_forward_hook(lambda mod, args, out, name=name: kept.setdefault(name, out))
                   for name, mod in points.items()]  # fmt: skip
        with context(), torch.autocast("cpu", dtype, enabled=precision == "bf16"):
            out = m(ids)
        for h in handles:
            h.remove()
        return out, {name: t.detach().float().clone() for name, t in kept.items()}

    (out, kept), (reference, expected) = run(torch.no_grad), run(torch.enable_grad)
    once = {}  # a hook that removes itself as it runs: gone before the layers, but what it kept is still kept

    def hook(mod, args, out):
        once["out"], once["as made"] = out, out.clone()
        handle.remove()

    handle = m.bert.embeddings.register_forward_hook(hook)
    with torch.no_grad(), torch.autocast("cpu", dtype, enabled=precision == "bf16"):
        m(ids)
    assert torch.equal(once["out"], once["as made"])
    tol = {"atol": 3e-2, "rtol": 3e-2} if precision == "bf16" else {}  # (bf16: fused kernels against F.linear)
    for name in points:  # (written over: a layer's sum added to it, values of about 1)
        torch.testing.assert_close(kept[name], expected[name], msg=name, **tol)
    torch.testing.assert_close(out.start_logits.float(), reference.start_logits.detach().float(), **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype, enabled=precision == "bf16"):
        x = torch.randn(2, 12, 32)
        before = x.clone()
        m.bert.encoder.layer[0](x, None)
        assert torch.equal(x, before)
        plain = m(ids)  # (no hook: the in-place sums and, in fp32, the shared tensor)
    assert torch.equal(plain.start_logits, out.start_logits)


@needs_fused_linear
def test_bf16_inference_fused_agrees_with_autocast_training_path():
    """The whole model in bf16: inference (fused kernels) against the autograd path (F.linear under autocast),
    same weights; and a model that ran the fused path still deep-copies and pickles (the packed weights are
    dropped, then rebuilt)."""
    import copy
    import pickle

    _, ours = hf_pair("gelu", attn="auto")
    ids, types, mask = padded_batch()
    with torch.autocast("cpu", torch.bfloat16):
        unfused = ours(ids, types, mask).start_logits.detach()
        with torch.no_grad():
            fused = ours(ids, types, mask).start_logits
    assert ours.qa_outputs._packed is not None
    ours.train()
    assert ours.qa_outputs._packed is None  # training drops the packed copies (they would go stale)
    ours.eval()
    keep = mask.bool()
    assert (fused - unfused)[keep].abs().max() < 0.05 and (fused - unfused)[keep].abs().max() > 0
    twin = copy.deepcopy(ours)
    assert twin.qa_outputs._packed is None and pickle.loads(pickle.dumps(ours)).qa_outputs._packed is None
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(twin(ids, types, mask).start_logits, fused)


def test_loss_matches_transformers_and_ignores_out_of_range():
    hf, ours = hf_pair("gelu")
    ids, types, mask = padded_batch()
    start, end = torch.tensor([1, 4, 6, 30]), torch.tensor([2, 5, 6, 40])  # the last is out of range
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, start_positions=start, end_positions=end)
        out = ours(ids, types, mask, start_positions=start, end_positions=end)
        # The out-of-range example is ignored: the loss equals that of the first three alone.
        first3 = ours(ids[:3], types[:3], mask[:3], start_positions=start[:3], end_positions=end[:3])
    assert torch.allclose(out.loss, ref.loss, atol=1e-5)
    assert torch.allclose(out.loss, first3.loss, atol=1e-5)
    s = torch.nn.functional.cross_entropy(out.start_logits[:3], start[:3])
    e = torch.nn.functional.cross_entropy(out.end_logits[:3], end[:3])
    assert torch.allclose(out.loss, (s + e) / 2, atol=1e-6)


def test_dropout_active_only_in_training():
    _, ours = hf_pair("gelu")
    ids, types, mask = padded_batch()
    ours.train()
    a, b = ours(ids, types, mask).start_logits, ours(ids, types, mask).start_logits
    assert not torch.allclose(a, b)
    ours.eval()
    assert torch.equal(ours(ids, types, mask).start_logits, ours(ids, types, mask).start_logits)


def test_cpu_dropout_mask_rate_scale_and_gradient():
    from bertqa.model import dropout

    torch.manual_seed(3)
    x = torch.randn(64, 100, 96, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.003  # 614,400 draws: 8 standard deviations
    assert torch.allclose(y[kept].float(), x[kept].float() / 0.9, rtol=2**-8, atol=0)  # scaled by 1 / (1 - p)
    # Exactly 1 / P(keep), for p rounded to a multiple of 2^-16 (1 / 0.9 would bias the expectation by 6.8e-6).
    x32 = x.detach().float()
    torch.manual_seed(5)
    y32 = dropout(x32, 0.1, True)
    assert torch.equal(y32[y32 != 0], x32[y32 != 0] * (65536 / (65536 - round(0.1 * 65536))))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, kept)  # the backward pass drops what the forward dropped
    torch.manual_seed(4)
    y = dropout(x, 0.1, True)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.1, True), y)  # the mask comes from torch's seeded generator
    assert dropout(x, 0.1, False) is x and torch.equal(dropout(x, 0.0, True), x)


@pytest.mark.parametrize("amx", [False, True])
def test_auto_attention_choices_on_a_cpu(monkeypatch, amx):
    """auto: blocked on a CPU in training, with or without attention dropout, at every length (the probabilities
    kept or recomputed), and in bf16 / fp16 inference but bf16 on a CPU with AMX; SDPA's fused kernel in fp32
    inference, and in bf16 inference on a CPU with AMX (the probe mocked: these machines differ)."""
    import bertqa.model as model

    monkeypatch.setattr(model, "cpu_has_amx", lambda: amx)
    _, ours = hf_pair("gelu")
    calls = []
    for name in ("eager", "sdpa", "blocked"):
        fn = model.ATTENTION[name]
        monkeypatch.setitem(model.ATTENTION, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.setattr(model, "KEEP_PROBS_MAX_LEN", 16)
    ours.set_attention("auto")
    for training, dropout, T, used in ((True, False, 17, "blocked"), (False, False, 8, "blocked"),
                                       (True, True, 16, "blocked"), (True, True, 17, "blocked"),
                                       (False, True, 17, "blocked")):  # fmt: skip
        ours.train(training)
        ours.set_attention_dropout(dropout)
        calls.clear()
        ours(torch.ones(2, T, dtype=torch.long))
        assert set(calls) == {used}, (training, dropout, T)
    ours.eval()
    bf16 = "sdpa" if amx else "blocked"
    for dtype, used in ((None, "sdpa"), (torch.bfloat16, bf16), (torch.float16, "blocked")):  # inference
        calls.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            ours(torch.ones(2, 8, dtype=torch.long))
        assert set(calls) == {used}, dtype
    assert model.auto_attention(torch.device("cuda"), 0.0) == "sdpa"


def test_cpu_has_amx_reads_the_amx_bf16_flag_and_onednn_cap(monkeypatch):
    import bertqa.model as model

    amx = {"amx_bf16": True, "avx512_bf16": True}
    for features, cap, has in ((amx, None, True), ({"avx512_bf16": True}, None, False), ({"amx_bf16": False}, None, False),
                               (None, None, False), (amx, "AVX512_CORE_BF16", False), (amx, "avx2", False),
                               (amx, "AVX512_CORE_AMX", True), (amx, "ALL", True)):  # fmt: skip
        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(name, raising=False)
        if cap:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        monkeypatch.setattr(model, "cpu_features", lambda f=features: f)
        model.cpu_has_amx.cache_clear()
        try:
            assert model.cpu_has_amx() is has, (features, cap)
        finally:
            model.cpu_has_amx.cache_clear()


def test_sdpa_attention_keeps_cudnn_attention_out(monkeypatch):
    """bertqa's SDPA calls may take flash, memory-efficient, math or a device's own ("overrideable") kernels, never
    cuDNN attention (a plan built per sequence length on CUDA); the process's own SDPA settings are as they were
    afterwards."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        b = torch.backends.cuda
        seen.append((b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(),
                     torch._C._get_overrideable_sdp_enabled()))  # (XPU's oneDNN attention, out-of-tree devices')  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    _, ours = hf_pair("gelu")
    ours.set_attention("sdpa")
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default, which bertqa must not change for others
    ours(torch.ones(2, 9, dtype=torch.long), attention_mask=torch.ones(2, 9, dtype=torch.long))
    assert seen and set(seen) == {(False, True, True, True, True)}, seen
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_compile_traces_the_model_whole():
    """torch.compile (--compile) sees one graph, no breaks: auto attention takes SDPA under compilation, and its
    backend restriction (sdpa_kernel) traces; in inference too, where the residual sums would read the pass's
    context variable, which dynamo cannot trace (a break at every sum, and fullgraph / strict export failed)."""
    _, ours = hf_pair("gelu", attn="auto")
    ids = torch.ones(2, 9, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for training, context in ((False, torch.enable_grad), (True, torch.enable_grad), (False, torch.no_grad),
                              (False, torch.inference_mode)):  # fmt: skip
        ours.train(training)
        ours.set_attention_dropout(training)
        with context():
            explained = torch._dynamo.explain(ours)(ids, torch.zeros_like(ids), mask)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, (context, explained.break_reasons)
    with torch.no_grad():
        exported = torch.export.export(ours.eval(), (ids, torch.zeros_like(ids), mask), strict=True)
        torch.testing.assert_close(exported.module()(ids, torch.zeros_like(ids), mask), ours(ids, attention_mask=mask))


def test_variable_length_batches_and_presets():
    _, ours = hf_pair("gelu")
    for T in (1, 9, 64):
        out = ours(torch.ones(2, T, dtype=torch.long))
        assert out.start_logits.shape == out.end_logits.shape == (2, T)
    base, large = BertConfig.preset("base"), BertConfig.preset("large")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    assert (
        large.num_hidden_layers,
        large.hidden_size,
        large.num_attention_heads,
        large.intermediate_size,
    ) == (24, 1024, 16, 4096)
    assert base.vocab_size == large.vocab_size == 30522 and large.max_position_embeddings == 512
    with pytest.raises(ValueError, match="hidden_act"):
        BertForQuestionAnswering(BertConfig(hidden_size=8, num_attention_heads=2, hidden_act="swish"))
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=10, num_attention_heads=3)


def test_config_json_round_trip(tmp_path):
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu_new", extra={"foo": 1})
    cfg.to_json(tmp_path / "config.json")
    back = BertConfig.from_json(tmp_path / "config.json")
    assert back == cfg and back.extra["foo"] == 1
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert hf.hidden_size == 64 and hf.hidden_act == "gelu_new"


def test_attention_choices_are_auto_and_every_kernel():
    """The CLI offers config.ATTENTION_CHOICES without importing torch; they must be the model's kernels."""
    import bertqa.config as config
    import bertqa.model as model

    assert config.ATTENTION_CHOICES == ("auto", *model.ATTENTION)


def test_the_configs_activation_names_are_the_models():
    """config.json is checked against config.ACTIVATIONS, without torch; the model runs model.ACTIVATIONS. Each is
    transformers' name too: a saved config.json loads there, and `bench --compare hf` builds the same model."""
    from transformers.activations import ACT2CLS

    from bertqa import config, model

    assert sorted(config.ACTIVATIONS) == sorted(model.ACTIVATIONS)
    assert set(config.ACTIVATIONS) <= set(ACT2CLS)


def test_reentrant_activation_checkpointing_gets_the_gradients_of_a_plain_backward():
    """Its first forward runs each layer without autograd, then runs it again from the same input: the in-place
    residual add of inference overwrote that input, and the gradients came out wrong (no error, the same loss)."""
    from torch.utils.checkpoint import checkpoint

    _, ours = hf_pair("gelu", attn="blocked")
    ids, types, mask = padded_batch()
    grads = []
    for reentrant in (None, True):
        ours.zero_grad()
        if reentrant:
            for layer in ours.bert.encoder.layer:
                layer.forward = lambda x, m, f=layer.forward: checkpoint(f, x, m, use_reentrant=True)
        out = ours(ids, types, mask, start_positions=torch.tensor([1, 2, 3, 4]), end_positions=torch.tensor([2] * 4))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@needs_fused_linear
def test_fused_linear_edges():
    """A weight made under inference_mode, reloaded there (no version counter tells of the copy); a frozen weight
    with a trainable bias (the fused kernel has no backward: the bias got no gradient); a float16 layer under
    bf16 autocast (oneDNN's kernel refused it)."""
    from bertqa.model import Linear

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        lin = Linear(8, 4)
        with torch.autocast("cpu", torch.bfloat16):
            lin(x)
            new = {"weight": torch.randn(4, 8), "bias": torch.randn(4)}
            lin.load_state_dict(new)
            torch.testing.assert_close(lin(x).float(), x @ new["weight"].T + new["bias"], atol=0.1, rtol=0.02)
    lin = Linear(8, 4)
    lin.weight.requires_grad_(False)
    with torch.autocast("cpu", torch.bfloat16):
        lin(x).float().sum().backward()
    assert lin.bias.grad is not None and torch.equal(lin.bias.grad, torch.full((4,), 3.0))
    half = Linear(8, 4).half()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert half(x).shape == (3, 4)


def test_half_precision_rows_with_every_key_masked_stay_finite():
    """In fp16 a score below -16 plus the dtype's lowest value overflowed to -inf, and such a row's softmax to NaN.
    Such a row averages its values in every form: fp16's bias (half of -65504, where fp16 steps by 16) left
    scores of magnitude 8 or more in the written-out and blocked forms, and every score in SDPA's fp32 arithmetic,
    and such a row took their softmax (random ones, the second case: scores up to about 30; review); fp16 inputs,
    and fp32 ones under fp16 autocast (the blocked form then computes in fp32, whose bias swallows the scores)."""
    import bertqa.model as model

    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 5, 8, generator=g)
    mask = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    for q, k in ((torch.full((1, 2, 5, 8), 5.0), torch.full((1, 2, 5, 8), -5.0)),
                 (torch.randn(1, 2, 5, 8, generator=g) * 4, torch.randn(1, 2, 5, 8, generator=g) * 4)):  # fmt: skip
        for attention, autocast in itertools.product(
            (model.eager_attention, model.blocked_attention, model.sdpa_attention), (False, True)
        ):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
                out = attention(*((q, k, v) if autocast else (q.half(), k.half(), v.half())), mask, 0.0)
            assert out.isfinite().all(), (attention.__name__, autocast)
            mean = v.half().float().mean(2, keepdim=True).expand_as(v)
            torch.testing.assert_close(out.float(), mean, atol=2e-3, rtol=0, msg=(attention.__name__, autocast))


@pytest.mark.parametrize("attn", ["auto", "sdpa", "eager"])
def test_a_forward_pass_on_meta_tensors_gives_shapes(attn):
    """Shape inference and FLOP counters run models on "meta" tensors, for which torch has no autocast (asking whether
    it is on raises there)."""
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    m = BertForQuestionAnswering(cfg, attn).eval().to("meta")
    ids = torch.ones(2, 6, dtype=torch.long, device="meta")
    out = m(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.start_logits.shape == (2, 6) and out.start_logits.device.type == "meta"


def test_dropout_whose_rate_rounds_to_0_or_1_takes_torchs():
    """BitDropout's rate is a multiple of 2^-16: 1 - 2^-20 rounded to 1 divided by zero, 2^-20 dropped nothing."""
    from bertqa.model import dropout

    x = torch.ones(4096)
    assert (dropout(x, 1 - 2**-20, True) == 0).sum() > 4000
    torch.manual_seed(0)
    assert 0 < (dropout(torch.ones(2**22), 2**-20, True) == 0).sum() < 30


def test_a_row_with_no_key_to_attend_gets_the_same_logits_from_every_attention():
    """(review) 'auto' takes SDPA in CPU fp32 inference and the blocked form with autograd: a row whose attention mask
    is all zeros got other logits from each (SDPA's bool mask); now every form averages its keys, as transformers'
    eager attention does (its SDPA form does not)."""
    hf, ours = hf_pair("gelu")
    hf.config._attn_implementation = "eager"
    ids, mask = torch.randint(0, 100, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).start_logits
    for attn in ("auto", "sdpa", "eager", "blocked"):
        ours.set_attention(attn)
        for context in (torch.inference_mode, torch.enable_grad):
            with context():
                got = ours(ids, attention_mask=mask).start_logits.detach()
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5, msg=f"{attn} {context.__name__}")


def test_inference_adds_each_sublayer_into_its_residual_in_place(monkeypatch):
    """What makes inference 1.3% faster; a change that always added out of place would pass every other test. In a
    model's pass only (a sublayer run on its own leaves its residual as it was), and not with autograd."""
    import bertqa.model as model

    _, ours = hf_pair("gelu")
    sublayer = ours.bert.encoder.layer[0].attention.output
    made, embed = [], model.BertEmbeddings.forward  # (not a hook: with one, nothing is written over)
    monkeypatch.setattr(model.BertEmbeddings, "forward", lambda *a: made.append(embed(*a)) or made[-1])
    ids = torch.randint(0, 100, (2, 5))
    for context, in_place in ((torch.inference_mode, True), (torch.no_grad, True), (torch.enable_grad, False)):
        made.clear()
        with context():
            ours(ids)
            x = ours.bert.embeddings(ids, torch.zeros_like(ids))
            h = ours.bert.encoder.layer[0].attention.self(x, None)
            added = sublayer.dense(h) + x  # layer 0's first sum: into the embeddings' output
        assert torch.equal(made[0], added if in_place else x), context
    with torch.inference_mode():
        h, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
        before = residual.clone()
        y = sublayer(h, residual)
        assert torch.equal(residual, before)
        torch.testing.assert_close(y, sublayer.LayerNorm(sublayer.dense(h) + before))


def plain_layer_forward(layer, x, mask):
    """BertLayer.forward through its modules, the activation's output kept by autograd."""
    a = layer.attention(x, mask)
    return layer.output(layer.intermediate(a), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"])
def test_training_keeps_only_the_activations_input_and_gets_autograds_gradients(hidden_act, dtype, monkeypatch):
    """Each layer keeps one 4C-wide tensor for the backward pass (the activation's input; the activation is
    computed again there), not two, and the gradients, with dropout on, under autocast and with some of the
    feed-forward parameters frozen, are those of autograd through the layer's own modules."""
    import bertqa.model as model

    _, ours = hf_pair(hidden_act, hidden_dropout_prob=0.1)
    ours.train()
    frozen = {"bert.encoder.layer.1.output.dense.bias", "bert.encoder.layer.2.intermediate.dense.weight",
              "bert.encoder.layer.2.output.dense.weight"}  # fmt: skip
    for name, p in ours.named_parameters():
        p.requires_grad_(name not in frozen)
    ids, types, mask = padded_batch()
    starts, ends = answer_spans()
    kept, grads = [], []
    for layer_forward in (model.BertLayer.forward, plain_layer_forward):
        monkeypatch.setattr(model.BertLayer, "forward", layer_forward)
        ours.zero_grad()
        torch.manual_seed(3)  # the same dropout masks
        wide = []

        def keep(t, wide=wide):  # the memory of each tensor of 4 x 20 positions, 4C = 80 wide
            if t.shape[-1:] == (80,) and t.numel() == 4 * 20 * 80:
                wide.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = ours(ids, types, mask, starts, ends)
        out.loss.backward()
        kept.append(len(set(wide)))
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    # Three layers; the plain form keeps no activation output for a frozen weight, and ReLU's output is its own
    # saved tensor and the next layer's: nothing to gain, so ReLU takes the plain form.
    assert kept == ([3, 3] if hidden_act == "relu" else [3, 5])
    assert grads[0].keys() == grads[1].keys() == {n for n, _ in ours.named_parameters()} - frozen
    for name, grad in grads[1].items():
        assert grads[0][name].dtype == torch.float32
        torch.testing.assert_close(grads[0][name], grad, atol=0, rtol=0, msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # forward AD's first use, inside torch
def test_training_takes_the_plain_form_where_the_recomputing_one_would_change_the_result(monkeypatch):
    """Hooks on the feed-forward modules run (pruning's pre-hook sets the weight it trains: a stale one was trained,
    then the second step raised), a second backward pass through the first (create_graph) gets autograd's
    gradients (the activation's second-order term was dropped), and torch.func and forward-mode AD work."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.utils import prune

    import bertqa.model as model

    _, base = hf_pair("gelu", attn="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, types, mask = padded_batch()
    starts, ends = answer_spans()

    def run(layer_forward, prepare):
        monkeypatch.setattr(model.BertLayer, "forward", layer_forward)
        ours = copy.deepcopy(base).train()
        torch.manual_seed(0)  # the same torch.func input
        return prepare(ours)

    def pruned(ours):  # two steps: the pruned weight is made again from the trained weight_orig
        dense = ours.bert.encoder.layer[0].output.dense
        prune.l1_unstructured(dense, "weight", 0.5)
        optimizer = torch.optim.SGD(ours.parameters(), lr=1.0)
        for _ in range(2):
            optimizer.zero_grad()
            ours(ids, types, mask, starts, ends).loss.backward()
            optimizer.step()
        return [dense.weight_orig.grad, dense.weight]

    def penalty(ours):  # the squared norm of the gradients, differentiated
        loss = ours(ids, types, mask, starts, ends).loss
        grads = torch.autograd.grad(loss, list(ours.parameters()), create_graph=True)
        sum((g * g).sum() for g in grads).backward()
        return [p.grad for p in ours.parameters()]

    def functional(ours):
        layer, x = ours.bert.encoder.layer[0], torch.randn(2, 5, 48)
        params = dict(layer.named_parameters())
        grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x, None)).pow(2).sum())(params)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x)), None)).tangent
        return [*grads.values(), tangent]

    recomputing = model.BertLayer.forward
    for prepare in (pruned, penalty, functional):
        got, want = run(recomputing, prepare), run(plain_layer_forward, prepare)
        assert len(got) == len(want), prepare.__name__
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=prepare.__name__)  # (summation order)
    called = []

    def hooked(ours):
        ours.bert.encoder.layer[2].intermediate.register_forward_hook(lambda *args: called.append(1))
        ours(ids, types, mask, starts, ends).loss.backward()

    run(recomputing, hooked)
    assert called == [1]


def test_replaced_feed_forward_modules_and_a_vmap_over_the_labels_take_the_plain_form():
    """A layer's `output` replaced by a subclass with its own forward (an adapter) ran in inference but was bypassed
    in training; a `dense` replaced by a module without `.weight` failed the check itself, even under no_grad; a
    vmap whose batched inputs do not reach the layer raised (a Function under any functorch transform does)."""
    from bertqa.model import BertOutput

    class HalfOutput(BertOutput):
        def forward(self, h, residual):
            return self.add_norm(self.dense(h) * 0.5, residual)

    _, ours = hf_pair("gelu", attn="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, types, mask = padded_batch()
    starts, ends = answer_spans()
    half = HalfOutput(ours.config)
    half.load_state_dict(ours.bert.encoder.layer[1].output.state_dict())
    ours.bert.encoder.layer[1].output = half
    ours.bert.encoder.layer[2].output.dense = torch.nn.Sequential(ours.bert.encoder.layer[2].output.dense)
    ours.train()
    with torch.no_grad():
        inferred = ours(ids, types, mask, starts, ends).loss
    assert ours(ids, types, mask, starts, ends).loss.item() == inferred.item()  # the same function, trained
    loss = torch.func.vmap(lambda s: ours(ids, types, mask, s, ends).loss)(starts.repeat(3, 1))  # three alike
    torch.testing.assert_close(loss, inferred.expand(3))
    # A forward replaced on an instance (accelerate's hooks do it) ran in inference only.
    inner = ours.bert.encoder.layer[0].intermediate
    inner.forward = lambda x, stock=inner.forward: stock(x) * 0.5
    with torch.no_grad():
        inferred = ours(ids, types, mask, starts, ends).loss
    assert ours(ids, types, mask, starts, ends).loss.item() == inferred.item()
    # Per-sample gradients (torch's expanded weights, a tensor subclass): the check read requires_grad, which raised.
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    _, fresh = hf_pair("gelu", attn="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    layer = fresh.bert.encoder.layer[0].train()
    call_for_per_sample_grads(layer)(torch.randn(4, 20, 48), None).sum().backward()
    assert layer.output.dense.weight.grad_sample.shape == (4, 48, 80)


def test_backward_under_inference_mode_gets_the_gradients_of_one_outside_it():
    """enable_grad() alone records nothing under inference_mode: the recomputed activation had no graph."""
    _, ours = hf_pair("gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours.train()
    ids, types, mask = padded_batch()
    grads = []
    for inference in (False, True):
        ours.zero_grad()
        loss = ours(ids, types, mask, *answer_spans()).loss
        with torch.inference_mode(inference):
            loss.backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # forward AD's first use, inside torch
@pytest.mark.parametrize("attention_dropout", [0.1, 0.0])
@pytest.mark.parametrize("attn", ["auto", "blocked"])
def test_cpu_training_under_torch_func_and_forward_ad_and_a_clear_error_for_a_second_backward(
    attn, attention_dropout, monkeypatch
):
    """`auto` trains a CPU model with BitDropout and BlockedAttention (with or without attention dropout): autograd
    Functions without functorch or forward-mode rules, which raised under torch.func.grad and make_dual (torch's
    message names neither); in fp32 inference `auto` chose SDPA's fused CPU kernel, which has no forward-mode rule.
    They run the plain forms there now; per-example gradients (vmap over a padded batch, each window its own mask)
    failed on the padding bias filled in place; forward-mode AD under no_grad overwrote the layer's input and its
    tangent (the in-place sum of inference). A second backward through the blocked attention (create_graph=True)
    raised bmm's `out=` error: it names the way out now."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    import bertqa.model as model

    _, ours = hf_pair("gelu", attn=attn, hidden_dropout_prob=0.1, attention_probs_dropout_prob=attention_dropout)
    ours.train()
    ids, types, mask = padded_batch()
    starts, ends = answer_spans()
    params = dict(ours.named_parameters())

    def loss_of(p, *batch):
        return torch.func.functional_call(ours, p, batch).loss

    torch.manual_seed(0)
    got = torch.func.grad(loss_of)(params, ids, types, mask, starts, ends)
    layer, x, direction = ours.bert.encoder.layer[0], torch.randn(4, 20, 48), torch.randn(4, 20, 48)
    inputs = x.clone(), direction.clone()
    tangents = {}
    for training in (True, False):
        layer.train(training)
        with fwAD.dual_level(), torch.no_grad():
            torch.manual_seed(1)
            tangents[training] = [fwAD.unpack_dual(layer(fwAD.make_dual(x, direction), None)).tangent]
        torch.manual_seed(1)
        tangents[training].append(torch.func.jvp(lambda x: layer(x, None), (x,), (direction,))[1])
    assert torch.equal(x, inputs[0]) and torch.equal(direction, inputs[1])
    ours.eval()  # per-example gradients, no dropout: against plain autograd, one window at a time
    one = torch.func.grad(lambda p, *window: loss_of(p, *(t[None] for t in window)))
    per_example = torch.func.vmap(one, in_dims=(None, 0, 0, 0, 0, 0))(params, ids, types, mask, starts, ends)
    for i in range(len(ids)):
        ours.zero_grad()
        ours(ids[i : i + 1], types[i : i + 1], mask[i : i + 1], starts[i : i + 1], ends[i : i + 1]).loss.backward()
        for name, p in params.items():
            torch.testing.assert_close(per_example[name][i], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # The same dropout masks (F.dropout's, from the same seed) and the written-out attention, by plain autograd.
    monkeypatch.setattr(model, "dropout", F.dropout)
    monkeypatch.setattr(model, "ATTENTION", {"blocked": model.eager_attention, "eager": model.eager_attention})
    ours.train().zero_grad()
    torch.manual_seed(0)
    ours(ids, types, mask, starts, ends).loss.backward()
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    for training in (True, False):  # the tangents by reverse mode, twice (the same masks, from the same seed)
        layer.train(training)
        torch.manual_seed(1)
        want = torch.autograd.functional.jvp(lambda x: layer(x, None), x, direction)[1]
        for tangent in tangents[training]:
            torch.testing.assert_close(tangent, want, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    ours.train()
    loss = ours(ids, types, mask, starts, ends).loss
    with pytest.raises(  # (with attention dropout too: the blocked attention applies it since 2026-12-06)
        RuntimeError,
        match=r"blocked attention .* no second derivative .*: build the model with attn_implementation='eager' \(",
    ):
        torch.autograd.grad(loss, list(params.values()), create_graph=True)
    ours.set_attention("eager")  # the written-out attention and BitDropout: differentiable twice
    torch.autograd.grad(ours(ids, types, mask, starts, ends).loss, list(params.values()), create_graph=True)


@pytest.mark.parametrize("attn", ["auto", "sdpa", "eager", "blocked"])
def test_a_batch_of_no_windows_runs_forward_and_backward(attn):
    """A batch of 0 windows gets (0, T) logits from every attention, with and without autograd, as in transformers
    (the blocked attention had no block to run and raised IndexError)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = BertForQuestionAnswering(cfg, attn_implementation=attn).train()
    ids, mask = torch.zeros(0, 8, dtype=torch.long), torch.ones(0, 8, dtype=torch.long)
    for dropout in (True, False):
        model.set_attention_dropout(dropout)
        out = model(ids, attention_mask=mask)
        assert out.start_logits.shape == out.end_logits.shape == (0, 8)
        (out.start_logits.sum() + out.end_logits.sum()).backward()
    model.eval()
    for context in (torch.inference_mode, torch.enable_grad):
        for dtype in (torch.float32, torch.bfloat16):
            with context(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                assert model(ids, attention_mask=mask).start_logits.shape == (0, 8)


def test_dropout_where_bert_has_it_and_a_fresh_model_as_its_config_says():
    """(mutation review) Each dropout runs once a training pass, on what BERT drops: the embeddings' LayerNorm
    output, each sub-layer's projection before its residual add; set_attention_dropout sets the rate; the weights
    start at the config's initializer_range, its pad_token_id's row at zero; token types default to 0; the logits
    are fp32 under bf16 autocast."""
    from bertqa.model import BertSelfAttention, Dropout

    cfg = BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                     hidden_dropout_prob=0.5, initializer_range=0.5, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    model = BertForQuestionAnswering(cfg).train()
    ids = torch.randint(2, 101, (4, 32))
    dropped = model.bert.embeddings(ids, torch.zeros_like(ids))  # (no hooks: the path training takes)
    assert 0.45 < (dropped == 0).float().mean().item() < 0.55  # exact zeros: dropped after the LayerNorm
    outputs, inputs = {}, {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: outputs.setdefault(n, []).append(out))
             for n, m in model.named_modules()]  # fmt: skip
    hooks += [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
              for n, m in model.named_modules() if isinstance(m, Dropout)]  # fmt: skip
    model(ids).start_logits.sum().backward()
    for h in hooks:
        h.remove()
    fed_by = {n: [k for k, outs in outputs.items() if any(o is x[0] for o in outs)] for n, x in inputs.items()}
    expected = {"bert.embeddings.dropout": ["bert.embeddings.LayerNorm"]}
    for i in range(2):
        for part in ("attention.output", "output"):
            expected[f"bert.encoder.layer.{i}.{part}.dropout"] = [f"bert.encoder.layer.{i}.{part}.dense"]
    assert fed_by == expected and all(len(x) == 1 for x in inputs.values())
    attention = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    for enabled, rate in ((False, 0.0), (True, cfg.attention_probs_dropout_prob), (False, 0.0)):
        model.set_attention_dropout(enabled)
        assert [m.dropout_p for m in attention] == [rate, rate]
    assert 0.45 < model.bert.encoder.layer[0].attention.self.query.weight.std().item() < 0.55
    words = model.bert.embeddings.word_embeddings
    assert words.padding_idx == 1 and not words.weight[1].any() and words.weight[0].any()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).start_logits, model(ids, torch.zeros_like(ids)).start_logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
    assert out.start_logits.dtype == out.end_logits.dtype == torch.float32


def test_attention_with_dropout_is_the_blocked_form_on_a_cpu_without_a_backward_too():
    """(mutation review) A training-mode pass under no_grad with attention dropout: SDPA's CPU dropout is its slow
    math path, so auto keeps the blocked form as in training."""
    import bertqa.model as model

    assert model.auto_attention(torch.device("cpu"), 0.1, torch.float32, backward=False) == "blocked"
    assert model.auto_attention(torch.device("cpu"), 0.0, torch.float32, backward=False) == "sdpa"
