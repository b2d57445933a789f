"""The chunked loss against plain, obviously-correct references, on values and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from selfaug.loss import (LiveTeacher, SampledTeacher, StoredTeacher, kl_from_topk, kl_sum, nll_sum,
                          sampled_kl_value_and_grad, shifted_labels)

B, T, H, V = 3, 47, 31, 123  # odd shapes


def _setup(dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _ref_logq(hidden, weight, bias):
    return torch.log_softmax(F.linear(hidden, weight, bias).float(), dim=-1)  # (B, T, V): the whole tensor


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("ignore_index", [-100, 5])
@pytest.mark.parametrize("fused", [True, False])
def test_nll_matches_reference(dtype, tol, chunk, ignore_index, fused):
    hidden, weight, bias = _setup(dtype, bias=True)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == ignore_index] = 0
    labels[:, : T // 3] = ignore_index
    labels[1] = ignore_index  # an all-masked row
    s, n = nll_sum(hidden, weight, bias, labels, ignore_index=ignore_index, chunk_rows=chunk, fused=fused)
    logq = _ref_logq(hidden, weight, bias)
    keep = labels != ignore_index
    ref = -logq[keep].gather(1, labels[keep][:, None]).sum()
    assert n == keep.sum().item()
    assert torch.allclose(s, ref, rtol=tol, atol=tol)
    for a, r in zip(_grads(s, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        assert torch.allclose(a.float(), r.float(), rtol=tol, atol=tol * 10)




def _ref_bucket_kl(logp, logq, ids, reverse=False):
    """Plain probabilities: p and q on the top-k, and one bucket with 1 - sum of the rest, in fp64."""
    p, q = logp.double().exp(), logq.double().exp()
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    if reverse:
        pk, qk, pr, qr = qk, pk, qr, pr
    terms = (pk * (pk.log() - qk.log())).sum(-1)
    if ids.shape[-1] == logp.shape[-1]:  # k = |V|: no bucket (1 - sum would be rounding noise)
        return terms
    tail = torch.where(pr > 1e-12, pr * (pr.clamp_min(1e-300).log() - qr.clamp_min(1e-300).log()), torch.zeros_like(pr))
    return terms + tail


@pytest.mark.parametrize("k", [1, 5, 16, V])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [3, 1000])
@pytest.mark.parametrize("fused", [True, False])
def test_stored_kl_matches_reference(k, reverse, chunk, fused):
    hidden, weight, _ = _setup()
    teacher_w = weight.detach() + 0.3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    rows_b = torch.tensor([0, 0, 0, 2, 2, 1])
    rows_t = torch.tensor([0, 1, 46, 3, 4, 10])
    logp_full = torch.log_softmax(F.linear(hidden.detach()[rows_b, rows_t], teacher_w).double(), -1)
    vals, ids = logp_full.topk(k, dim=-1)
    tail = logp_full.scatter(1, ids, float("-inf")).logsumexp(-1)  # exact tail, as stage 1 stores it
    teacher = StoredTeacher(ids, vals.float(), tail.float())
    s, n = kl_sum(hidden, weight, None, rows_b, rows_t, teacher, reverse=reverse, chunk_rows=chunk, fused=fused)
    logq = _ref_logq(hidden, weight, None)[rows_b, rows_t]
    ref = _ref_bucket_kl(logp_full, logq, ids, reverse).sum()
    assert n == 6
    assert torch.allclose(s.double(), ref, rtol=1e-4, atol=1e-5)
    ga = _grads(s, (hidden, weight))
    gr = _grads(ref, (hidden, weight))
    for a, r in zip(ga, gr):
        assert torch.allclose(a.double(), r.double(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_k_equals_vocab_gives_full_kl_values_and_gradients(reverse, fused):
    """With k = |V| the stored-teacher loss equals the online full-vocabulary one."""
    hidden, weight, _ = _setup(seed=3)
    teacher_hidden = hidden.detach() + 0.5 * torch.randn_like(hidden)
    rows_b, rows_t = torch.tensor([0, 1, 1, 2]), torch.tensor([5, 0, 46, 20])
    th = teacher_hidden[rows_b, rows_t]
    logp_full = torch.log_softmax(F.linear(th, weight.detach()), -1)
    vals, ids = logp_full.topk(V, dim=-1)
    stored = StoredTeacher(ids, vals, torch.full((4,), float("-inf")))
    live = LiveTeacher(th, weight.detach())
    s1, _ = kl_sum(hidden, weight, None, rows_b, rows_t, stored, reverse=reverse, chunk_rows=3, fused=fused)
    s2, _ = kl_sum(hidden, weight, None, rows_b, rows_t, live, reverse=reverse, chunk_rows=1024, fused=fused)
    # the plain reference: whole (N, V) tensors, torch's own kl_div
    logq = _ref_logq(hidden, weight, None)[rows_b, rows_t]
    ref = F.kl_div(logq, logp_full, log_target=True, reduction="sum") if not reverse else \
        F.kl_div(logp_full, logq, log_target=True, reduction="sum")
    assert torch.allclose(s1, ref, rtol=1e-5, atol=1e-6) and torch.allclose(s2, ref, rtol=1e-5, atol=1e-6)
    for a, b, r in zip(_grads(s1, (hidden, weight)), _grads(s2, (hidden, weight)), _grads(ref, (hidden, weight))):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-6) and torch.allclose(b, r, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_for_the_same_model_and_bucket_never_exceeds_full():
    hidden, weight, _ = _setup(seed=4)
    rows_b, rows_t = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    h = hidden.detach()[rows_b, rows_t]
    logp = torch.log_softmax(F.linear(h, weight.detach()), -1)
    vals, ids = logp.topk(8, dim=-1)
    tail = logp.scatter(1, ids, float("-inf")).logsumexp(-1)
    s, _ = kl_sum(hidden, weight, None, rows_b, rows_t, StoredTeacher(ids, vals, tail))
    assert abs(s.item()) < 1e-6
    other = weight.detach() + torch.randn_like(weight)
    logq = torch.log_softmax(F.linear(h, other), -1)
    bucket = kl_from_topk(logq, ids, vals, tail)
    full = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert (bucket <= full + 1e-6).all() and (bucket > 0).all()


def test_renormalized_variant_is_the_topk_renormalized_kl():
    g = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(torch.randn(4, V, generator=g), -1)
    logq = torch.log_softmax(torch.randn(4, V, generator=g), -1)
    vals, ids = logp.topk(10, -1)
    got = kl_from_topk(logq, ids, vals, torch.zeros(4), tail="renormalize")
    p = vals.exp() / vals.exp().sum(-1, keepdim=True)
    q = logq.gather(1, ids).exp()
    q = q / q.sum(-1, keepdim=True)
    assert torch.allclose(got, (p * (p.log() - q.log())).sum(-1), atol=1e-6)


def test_all_masked_batch_gives_zero_sums_and_zero_gradients():
    hidden, weight, _ = _setup()
    labels = torch.full((B, T), -100)
    s, n = nll_sum(hidden, weight, None, labels)
    empty = torch.empty(0, dtype=torch.long)
    k, m = kl_sum(hidden, weight, None, empty, empty, StoredTeacher(torch.empty(0, 4).long(), torch.empty(0, 4), torch.empty(0)))
    assert n == 0 and m == 0 and s.item() == 0 and k.item() == 0
    (s + k).backward()
    assert hidden.grad.abs().sum() == 0


def test_frozen_head_gets_no_gradient_and_hidden_does():
    hidden, weight, _ = _setup()
    weight = weight.detach()
    labels = torch.randint(0, V, (B, T))
    s, _ = nll_sum(hidden, weight, None, labels, chunk_rows=5)
    s.backward()
    assert weight.grad is None and hidden.grad.abs().sum() > 0


def test_shifted_labels_cover_exactly_the_response_tokens():
    ids = torch.arange(10).repeat(2, 1)
    labels = shifted_labels(ids, torch.tensor([4, 2]), torch.tensor([10, 6]))
    assert labels[0].tolist() == [-100, -100, -100, 4, 5, 6, 7, 8, 9, -100]
    assert labels[1].tolist() == [-100, 2, 3, 4, 5, -100, -100, -100, -100, -100]


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.float32])
def test_fused_bucket_gradient_equals_autograd_with_rounded_stored_values(value_dtype):
    """Stored fp16 values do not sum to exactly 1: the closed form still is the exact derivative."""
    hidden, weight, _ = _setup(seed=6)
    rows_b, rows_t = torch.arange(3).repeat_interleave(5), torch.arange(15) % T
    logp = torch.log_softmax(F.linear(hidden.detach()[rows_b, rows_t], weight.detach() * 2), -1)
    vals, ids = logp.topk(7, -1)
    tail = logp.scatter(1, ids, float("-inf")).logsumexp(-1)
    teacher = StoredTeacher(ids, vals.to(value_dtype).float(), tail)
    a, _ = kl_sum(hidden, weight, None, rows_b, rows_t, teacher, chunk_rows=4, fused=True)
    b, _ = kl_sum(hidden, weight, None, rows_b, rows_t, teacher, chunk_rows=4, fused=False)
    assert torch.allclose(a, b, rtol=1e-5)
    for x, y in zip(_grads(a, (hidden, weight)), _grads(b, (hidden, weight))):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


def test_fused_path_trains_the_head_like_autograd():
    hidden, weight, bias = _setup(seed=8, bias=True)
    labels = torch.randint(0, V, (B, T))
    a, _ = nll_sum(hidden, weight, bias, labels, chunk_rows=10, fused=True)
    b, _ = nll_sum(hidden, weight, bias, labels, chunk_rows=10, fused=False)
    for x, y in zip(_grads(a, (hidden, weight, bias)), _grads(b, (hidden, weight, bias))):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)


# the sampled teacher (teacher.signal=sampled): KL ~ sum_j (c_j / N)(log p_j - log q_j)

def _draws(logp, n_samples, g):
    """Unique ids, weights c/N and log p of N draws per row, padded like the reader pads them."""
    rows = logp.shape[0]
    ids = torch.multinomial(logp.exp(), n_samples, replacement=True, generator=g).sort(-1).values  # (rows, N)
    uniq = [torch.unique(r, return_counts=True) for r in ids]
    width = max(len(u) for u, _ in uniq)
    out_ids, w = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width)
    for i, (u, c) in enumerate(uniq):
        out_ids[i, :len(u)], w[i, :len(u)] = u, c / n_samples
    return SampledTeacher(out_ids, w, torch.where(w > 0, logp.gather(1, out_ids), 0.0))


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_sampled_kl_closed_form_equals_autograd(chunk):
    hidden, weight, bias = _setup(bias=True)
    g = torch.Generator().manual_seed(5)
    rows_b, rows_t = torch.randint(0, B, (40,), generator=g), torch.randint(0, T, (40,), generator=g)
    teacher_logp = torch.log_softmax(torch.randn(40, V, generator=g) * 2, -1)
    teacher = _draws(teacher_logp, 16, g)
    fast, n = kl_sum(hidden, weight, bias, rows_b, rows_t, teacher, chunk_rows=chunk, fused=True)
    slow, _ = kl_sum(hidden, weight, bias, rows_b, rows_t, teacher, chunk_rows=chunk, fused=False)
    # the plain reference: the whole (N, V) log-softmax, the formula written out
    logq = _ref_logq(hidden, weight, bias)[rows_b, rows_t]
    ref = (teacher.weights * torch.where(teacher.weights > 0, teacher.logprobs - logq.gather(1, teacher.ids), 0.0)).sum()
    assert n == 40 and torch.allclose(fast, ref, atol=1e-5) and torch.allclose(slow, ref, atol=1e-5)
    for a, b, r in zip(_grads(fast, (hidden, weight, bias)), _grads(slow, (hidden, weight, bias)),
                       _grads(ref, (hidden, weight, bias))):
        assert torch.allclose(a, r, atol=1e-5) and torch.allclose(b, r, atol=1e-5)


def test_sampled_kl_is_unbiased_for_the_exact_kl_and_its_gradient():
    """Over many independent draws, the estimate's mean is the exact KL and its gradient's mean is q - p.
    Tolerance: 5 standard errors of the mean, measured from the draws themselves."""
    g = torch.Generator().manual_seed(11)
    logp = torch.log_softmax(torch.randn(1, 50, generator=g) * 1.5, -1).expand(4000, 50).contiguous()
    logits = torch.randn(1, 50, generator=g).expand(4000, 50).contiguous()
    teacher = _draws(logp, 16, g)
    values, grad = sampled_kl_value_and_grad(logits.clone(), teacher.ids, teacher.weights, teacher.logprobs)
    logq = torch.log_softmax(logits[0], -1)
    exact = (logp[0].exp() * (logp[0] - logq)).sum()
    se = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - exact) < 5 * se, (values.mean().item(), exact.item(), se.item())
    grad_se = grad.std(0) / math.sqrt(len(grad))
    assert ((grad.mean(0) - (logq.exp() - logp[0].exp())).abs() <= 5 * grad_se + 1e-7).all()
    # top-k at k=16 (the bucket KL) is biased low: it never exceeds the exact KL, and here stays below
    ids = logp[:1].topk(16, -1).indices
    tail = logp[:1].scatter(1, ids, float("-inf")).logsumexp(-1)
    bucket = kl_from_topk(logq[None], ids, logp[:1].gather(1, ids), tail)
    assert bucket.item() < exact.item() - 10 * se


# ---- one pass for NLL and KL: against the naive loss, the buffers it keeps, no gradient work without grad ----

def _teacher_of(kind, rows_b, rows_t, hidden, weight, g):
    """A teacher for the rows: stored top-k, sampled draws or live, from a perturbed copy of the model."""
    th = hidden.detach().float()[rows_b, rows_t] + 0.5 * torch.randn(len(rows_b), H, generator=g)
    logp = torch.log_softmax(F.linear(th, weight.detach().float()), -1)
    if kind == "topk":
        vals, ids = logp.topk(9, -1)
        return StoredTeacher(ids, vals, logp.scatter(1, ids, float("-inf")).logsumexp(-1)), logp
    if kind == "sampled":
        return _draws(logp, 16, g), logp
    return LiveTeacher(th, weight.detach().float()), logp


def _naive(hidden, weight, bias, labels, rows_b, rows_t, teacher, logp, c_nll, c_kl, kind, ignore_index):
    """The whole (B, T, V) log-softmax, the formulas written out: the loss, the NLL sum, the KL sum."""
    logq = torch.log_softmax(F.linear(hidden, weight, bias).float(), -1)
    keep = labels != ignore_index
    nll = -logq[keep].gather(1, labels[keep][:, None]).sum()
    q = logq[rows_b, rows_t]
    if kind == "topk":
        kl = _ref_bucket_kl(logp, q, teacher.topk_ids).sum().float()
    elif kind == "sampled":
        w = teacher.weights
        kl = (w * torch.where(w > 0, teacher.logprobs - q.gather(1, teacher.ids), 0.0)).sum()
    else:
        kl = F.kl_div(q, logp, log_target=True, reduction="sum")
    return c_nll * nll + c_kl * kl, nll, kl


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kind", ["topk", "sampled", "live"])
@pytest.mark.parametrize("chunk", [5, 1024])
@pytest.mark.parametrize("fused", [True, False])
def test_one_pass_equals_the_naive_loss_on_values_and_gradients(dtype, tol, kind, chunk, fused):
    """NLL and KL through one chunked pass (KL rows overlapping NLL rows, as positions=all makes them; an
    ignore_index other than -100; a bias) against the naive loss, per dtype with its own tolerance."""
    from selfaug.loss import selfaug_loss
    hidden, weight, bias = _setup(dtype, seed=9, bias=True)
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == 7] = 0
    labels[:, :20] = 7  # ignore_index 7: the prompt
    rows_b = torch.arange(B).repeat_interleave(25)
    rows_t = torch.arange(15, 40).repeat(B)  # overlaps the NLL rows from t = 20 on
    teacher, logp = _teacher_of(kind, rows_b, rows_t, hidden, weight, g)
    c_nll, c_kl = 2 / 81, 0.5 / 75
    loss, nll, kl = selfaug_loss(hidden, weight, bias, labels, rows_b, rows_t, teacher, c_nll, c_kl,
                                 chunk_rows=chunk, fused=fused, ignore_index=7)
    ref_loss, ref_nll, ref_kl = _naive(hidden, weight, bias, labels, rows_b, rows_t, teacher, logp, c_nll, c_kl,
                                       kind, 7)
    assert not nll.requires_grad and not kl.requires_grad and kl > 0
    for a, r in ((loss, ref_loss), (nll, ref_nll), (kl, ref_kl)):
        assert torch.allclose(a.float(), r.float().detach(), rtol=tol, atol=tol), (a, r)
    got, want = _grads(loss, (hidden, weight, bias)), _grads(ref_loss, (hidden, weight, bias))
    for a, r in zip(got, want):
        assert a.dtype == r.dtype == dtype  # each gradient in its parameter's dtype
        scale = r.float().abs().max()
        assert (a.float() - r.float()).abs().max() <= tol * scale + 1e-7, ((a.float() - r.float()).abs().max(), scale)


def _saved(fn):
    """The tensors autograd keeps for backward while fn runs: (shape, dtype) of each."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = fn()
    return out, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_head_gradient_buffer_exists_only_when_the_head_trains_and_in_its_dtype(dtype):
    from selfaug.loss import selfaug_loss
    hidden, weight, _ = _setup(dtype, seed=10)
    labels = torch.randint(0, V, (B, T))
    rows_b, rows_t = torch.zeros(6, dtype=torch.long), torch.arange(6)
    teacher, _ = _teacher_of("topk", rows_b, rows_t, hidden, weight, torch.Generator().manual_seed(1))
    run = lambda w: selfaug_loss(hidden, w, None, labels, rows_b, rows_t, teacher, 1.0, 1.0, chunk_rows=8)[0]
    _, trained = _saved(lambda: run(weight))
    _, frozen = _saved(lambda: run(weight.detach()))  # LoRA: the head is frozen
    assert trained == [((B * T, H), dtype), ((V, H), dtype)]  # one hidden gradient for both terms, one head's
    assert frozen == [((B * T, H), dtype)]  # no (V, H) buffer at all


def test_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (eval's drift, a trainer's evaluation) nothing is saved and the head pass is asked for no
    gradient, although the inputs require grad (ctx.needs_input_grad would say they do)."""
    from selfaug import loss
    hidden, weight, _ = _setup(seed=11)
    labels = torch.randint(0, V, (B, T))
    asked = []
    real = loss._head_pass
    monkeypatch.setattr(loss, "_head_pass", lambda *a: asked.append(a[-1]) or real(*a))
    with torch.no_grad():
        (s, _), kept = _saved(lambda: loss.nll_sum(hidden, weight, None, labels))
    assert asked == [(False, False, False)] and kept == [] and not s.requires_grad
    with_grad, _ = loss.nll_sum(hidden, weight, None, labels)
    assert asked[-1] == (True, True, False) and torch.allclose(s, with_grad.detach())


def test_the_head_gradient_is_summed_over_chunks_in_fp32_and_rounded_once():
    """bf16 weights, 32 chunks: the head's gradient within a bf16 rounding of the exact one (fp64). A bf16 sum
    rounded after every chunk drifts with the number of chunks (0.6 % here)."""
    from selfaug.loss import nll_sum
    g = torch.Generator().manual_seed(12)
    rows, hdim, vocab = 256, 64, 512
    hidden = torch.randn(1, rows, hdim, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=g) * 0.05).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    s, _ = nll_sum(hidden, weight, None, labels, chunk_rows=rows // 32)
    s.backward()
    exact = weight.detach().double()
    exact.requires_grad_()
    F.cross_entropy(hidden.detach().double()[0] @ exact.t(), labels[0], reduction="sum").backward()
    err = ((weight.grad.double() - exact.grad).norm() / exact.grad.norm()).item()
    assert err < 3e-3, err  # bf16's own rounding of the result: 2^-9 per element at most
