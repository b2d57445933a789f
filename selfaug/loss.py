"""The SelfAug loss: NLL on response tokens plus alpha * KL on prompt positions (docs/design.md, "The loss").

Pure functions of tensors returning sums (and counts); the caller divides once by the token counts of the
whole optimizer step. The lm_head is applied here, `chunk_rows` positions at a time, from the final
hidden states, so no (tokens x vocabulary) fp32 tensor is ever whole: one pass (`_HeadLoss`) takes the
NLL and KL terms of a micro-batch with their coefficients, computes each chunk's gradient with respect
to the hidden states (and the head weight, when it trains) in the forward, and frees the chunk's
logits at once (the Liger-Kernel scheme). What lives from forward to backward is one hidden-state
gradient shared by the terms and, only when the head trains, one weight gradient in the weight's dtype,
summed over the chunks in fp32 (addmm) and rounded once. With grad disabled, or nothing to differentiate, only the sums are computed.
The common cases (NLL, forward bucket KL, forward full KL, sampled KL) use closed-form gradients over
one (n, V) buffer; the others, and the tests' twin of every fast path (`fused=False`), use autograd
per chunk.

The teacher signal is one of three small typed objects:
- `StoredTeacher`: top-k log-probs and the tail log-mass from the teacher store (offline mode);
- `SampledTeacher`: N draws from the teacher as unique ids, weights c/N and exact log-probs
  (offline, teacher.signal=sampled): the unbiased estimate sum_j (c_j/N)(log p_j - log q_j);
- `LiveTeacher`: the teacher's own hidden states and head (online mode: full-vocabulary KL).

KL variants (all through `kl_categorical`, the only place that handles zero masses):
- `bucket` (default): exact KL between p and q after merging the tokens outside the stored top-k
  into one bucket. Never exceeds the full KL; equals it when k = |V|.
- `renormalize`: drop the bucket and renormalize p and q over the top-k. Biased: it ignores how much
  mass q puts outside the top-k, and is kept only for comparison with peers that use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def kl_categorical(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities over the same categories. (n, C), (n, C) -> (n,).
    A category where p is 0 adds 0 (and no gradient), whatever q is."""
    zero = torch.isneginf(logp)
    diff = torch.where(zero, torch.zeros_like(logq), logp - torch.where(zero, torch.zeros_like(logq), logq))
    return (logp.exp() * diff).sum(-1)


def bucket_logprobs(logq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """q over the top-k ids plus one bucket for the rest: (n, V), (n, K) -> (n, K + 1).
    The bucket's log-mass is a logsumexp over the tokens outside the top-k: exact, no 1 - sum."""
    logq_k = logq.gather(1, ids)  # (n, K)
    if ids.shape[1] >= logq.shape[1]:  # k = |V|: the bucket is empty
        tail = torch.full_like(logq_k[:, 0], NEG_INF)
    else:
        tail = logq.scatter(1, ids, NEG_INF).logsumexp(-1)  # (n,)
    return torch.cat([logq_k, tail[:, None]], dim=1)


def kl_from_topk(logq, ids, topk_logprobs, tail_logprob, reverse: bool = False, tail: str = "bucket"):
    """KL between the stored teacher p (top-k + tail) and q (full log-probs). (n, V) -> (n,)."""
    if tail == "bucket":
        logp = torch.cat([topk_logprobs, tail_logprob[:, None]], dim=1)  # (n, K + 1)
        logq = bucket_logprobs(logq, ids)
    elif tail == "renormalize":  # biased; see the module docstring
        logp = torch.log_softmax(topk_logprobs, dim=-1)
        logq = torch.log_softmax(logq.gather(1, ids), dim=-1)
    else:
        raise ValueError(f"unknown tail treatment {tail!r}")
    return kl_categorical(logq, logp) if reverse else kl_categorical(logp, logq)


# Closed forms for the common cases: value and d(value)/d(logits) from one (n, V) buffer, the logits
# themselves (overwritten), with no autograd graph over (n, V) tensors. tests/test_loss.py checks
# each against the autograd path above and against plain references.

def nll_value_and_grad(logits: torch.Tensor, targets: torch.Tensor):
    """-log softmax(logits)[target] per row and its gradient (softmax - onehot). (n, V) fp32 -> (n,), (n, V)."""
    lse = logits.logsumexp(-1)  # (n,)
    values = lse - logits.gather(1, targets[:, None]).squeeze(1)
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
    grad.scatter_add_(1, targets[:, None], torch.full_like(values[:, None], -1.0))
    return values, grad


def bucket_kl_value_and_grad(logits, ids, topk_logprobs, tail_logprob):
    """Forward KL_bucket(p || q) per row and its gradient with respect to q's logits.

    With q = softmax(z), S the stored ids, P = sum_S p + p_R:
      dKL/dz_j = q_j P - p_j          for j in S
               = q_j (P - p_R / q_R)  for j outside S
    q_R is summed directly over the tokens outside S (no 1 - sum cancellation)."""
    lse = logits.logsumexp(-1)  # (n,)
    logq_k = logits.gather(1, ids) - lse[:, None]  # (n, K)
    q = logits.sub_(lse[:, None]).exp_()  # (n, V) softmax, in place
    q.scatter_(1, ids, 0.0)
    q_tail = q.sum(-1)  # (n,) mass outside the top-k
    logq = torch.cat([logq_k, q_tail.clamp_min(1e-30).log()[:, None]], dim=1)
    logp = torch.cat([topk_logprobs, tail_logprob[:, None]], dim=1)  # (n, K + 1)
    values = kl_categorical(logp, logq)
    p_k, p_tail = topk_logprobs.exp(), tail_logprob.exp()
    mass = p_k.sum(-1) + p_tail  # 1 up to the stored values' rounding
    ratio = torch.where(p_tail > 0, p_tail / q_tail.clamp_min(1e-30), torch.zeros_like(p_tail))
    grad = q.mul_((mass - ratio)[:, None])  # the columns of S are 0 here
    grad.scatter_(1, ids, logq_k.exp() * mass[:, None] - p_k)
    return values, grad


def sampled_kl_value_and_grad(logits, ids, weights, logp):
    """The sampled estimate of forward KL(p || q) per row and its gradient with respect to q's logits.

    ids, weights, logp (n, M): the unique sampled ids, their counts / N (0 on padding) and log p.
      KL ~ sum_j w_j (log p_j - log q_j),  E[w_j] = p_j: unbiased.
      d/dz = q * sum_j w_j - sum_j w_j e_j = q - c/N   (the weights sum to 1)."""
    lse = logits.logsumexp(-1)  # (n,)
    logq = logits.gather(1, ids) - lse[:, None]  # (n, M)
    values = (weights * torch.where(weights > 0, logp - logq, 0.0)).sum(-1)  # padding adds 0, whatever q is
    grad = logits.sub_(lse[:, None]).exp_().mul_(weights.sum(-1, keepdim=True))  # softmax * sum w, in place
    grad.scatter_add_(1, ids, -weights)
    return values, grad


def full_kl_value_and_grad(logits, logp):
    """Forward KL(p || q) over the full vocabulary per row and its gradient q - p (p sums to 1)."""
    logq = torch.log_softmax(logits, dim=-1)
    values = kl_categorical(logp, logq)
    return values, logq.exp_().sub_(logp.exp())


@dataclass
class StoredTeacher:
    """Per KL row: the teacher's top-k ids and log-probs and the log of the remaining mass. On the host they
    keep the stored widths (int32 ids, float16 or float32 values); `to_device` widens them where they are used."""
    topk_ids: torch.Tensor  # (N, K) int64 (int32 on the host)
    topk_logprobs: torch.Tensor  # (N, K) fp32 (as stored on the host), normalized over the full vocabulary
    tail_logprob: torch.Tensor  # (N,) fp32

    def to_device(self, device, non_blocking: bool = False) -> "StoredTeacher":
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return StoredTeacher(move(self.topk_ids).long(), move(self.topk_logprobs).float(), move(self.tail_logprob).float())

    def pin_memory(self) -> "StoredTeacher":  # torch's DataLoader calls it (pin_memory=True): an asynchronous copy
        return StoredTeacher(*(t.pin_memory() for t in (self.topk_ids, self.topk_logprobs, self.tail_logprob)))

    def kl(self, logq, rows: slice, reverse: bool, tail: str):
        return kl_from_topk(logq, self.topk_ids[rows], self.topk_logprobs[rows].float(),
                            self.tail_logprob[rows].float(), reverse, tail)

    def fused(self, reverse: bool, tail: str):
        if reverse or tail != "bucket":
            return None
        return lambda logits, rows: bucket_kl_value_and_grad(
            logits, self.topk_ids[rows], self.topk_logprobs[rows].float(), self.tail_logprob[rows].float())


@dataclass
class SampledTeacher:
    """Per KL row: the unique ids of N draws from the teacher, their weights c/N and exact log-probs,
    padded to the row with the most unique ids (weight 0 on padding)."""
    ids: torch.Tensor  # (N, M) int64 (int32 on the host)
    weights: torch.Tensor  # (N, M) fp32
    logprobs: torch.Tensor  # (N, M) fp32

    def to_device(self, device, non_blocking: bool = False) -> "SampledTeacher":
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return SampledTeacher(move(self.ids).long(), move(self.weights).float(), move(self.logprobs).float())

    def pin_memory(self) -> "SampledTeacher":  # as StoredTeacher's
        return SampledTeacher(*(t.pin_memory() for t in (self.ids, self.weights, self.logprobs)))

    def kl(self, logq, rows: slice, reverse: bool, tail: str):
        if reverse:
            raise ValueError("a sampled teacher gives the forward KL only")
        w = self.weights[rows]
        return (w * torch.where(w > 0, self.logprobs[rows] - logq.gather(1, self.ids[rows]), 0.0)).sum(-1)

    def fused(self, reverse: bool, tail: str):
        return None if reverse else lambda logits, rows: sampled_kl_value_and_grad(
            logits, self.ids[rows], self.weights[rows], self.logprobs[rows])


@dataclass
class LiveTeacher:
    """Per KL row: the frozen teacher's final hidden state and its head (online mode)."""
    hidden: torch.Tensor  # (N, H), no grad
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None

    def kl(self, logq, rows: slice, reverse: bool, tail: str):
        logp = self.logprobs(rows)
        return kl_categorical(logq, logp) if reverse else kl_categorical(logp, logq)

    @torch.no_grad()
    def logprobs(self, rows: slice):
        return torch.log_softmax(F.linear(self.hidden[rows], self.weight, self.bias).float(), dim=-1)

    def fused(self, reverse: bool, tail: str):
        if reverse:
            return None
        return lambda logits, rows: full_kl_value_and_grad(logits, self.logprobs(rows))


class _Term(NamedTuple):
    """One summed loss term over rows of the flattened hidden states: its rows (N,) into (B * T), and either a
    closed form `fused(logits (n, V) fp32, rows slice) -> (values (n,), dvalues/dlogits (n, V) fp32)` or, for
    the autograd path, `row_fn(logq (n, V) fp32 log-probs, rows slice) -> values (n,)`."""
    rows: torch.Tensor
    row_fn: Callable
    fused: Callable | None


def _nll_term(labels, ignore_index: int, fused: bool, rows=None) -> _Term:
    flat = labels.reshape(-1)
    if rows is None:  # (N,): the head runs only where a label is (collation gives them, found on the host)
        rows = (flat != ignore_index).nonzero().squeeze(1)
    targets = flat[rows].long()
    row_fn = lambda logq, sl: -logq.gather(1, targets[sl, None]).squeeze(1)
    fast = (lambda logits, sl: nll_value_and_grad(logits, targets[sl])) if fused else None
    return _Term(rows, row_fn, fast)


def _kl_term(rows_b, rows_t, width: int, teacher, reverse: bool, tail: str, fused: bool) -> _Term:
    rows = rows_b.long() * width + rows_t.long()  # (N,) in the teacher's row order
    return _Term(rows, lambda logq, sl: teacher.kl(logq, sl, reverse, tail), teacher.fused(reverse, tail) if fused else None)


def _head_pass(hidden, weight, bias, terms, coefs, chunk_rows: int, need: tuple):
    """The terms' sums and, where `need` (hidden, weight, bias) asks, the gradient of sum_t coef_t * term_t:
    every term's rows `chunk_rows` at a time through the head, each chunk's (n, V) logits made, used and freed
    at once. One hidden-state gradient for all terms (B * T, H) in the hidden states' dtype, and, only when
    the head trains, one weight gradient (V, H), summed over the chunks in fp32 by addmm and rounded once to the
    weight's dtype at the end (a bf16 sum rounded at every chunk: 0.64 % off over 32 chunks, against 0.17 %). A
    term with coefficient 0 is summed without gradient work."""
    need_h, need_w, need_b = need
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, H)
    grad_h = torch.zeros_like(flat) if need_h else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # rounded once, below
    grad_b = torch.zeros_like(bias) if need_b else None
    sums = []
    for term, coef in zip(terms, coefs):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = any(need) and coef != 0
        for start in range(0, term.rows.numel(), chunk_rows):
            sl = slice(start, start + chunk_rows)
            idx = term.rows[sl]
            h = flat.index_select(0, idx)  # (n, H)
            if term.fused is not None or not grads:
                with torch.no_grad():
                    logits = F.linear(h, weight, bias).float()  # (n, V) fp32, this chunk only
                    if term.fused is None:
                        total += term.row_fn(torch.log_softmax(logits, dim=-1), sl).sum()
                        continue
                    values, g = term.fused(logits, sl)  # g (n, V) fp32, d values / d logits
                    total += values.sum()
                    if not grads:
                        continue
                    g = g.mul_(coef)  # (n, V) fp32
                    if need_w:
                        grad_w.addmm_(g.t(), h.float())  # fp32 in, fp32 sum
                    g = g.to(weight.dtype)
                    if need_h:
                        grad_h.index_add_(0, idx, (g @ weight).to(grad_h.dtype))  # rows shared by terms add up
                    if need_b:
                        grad_b += g.float().sum(0).to(grad_b.dtype)
                continue
            h_ = h.detach().requires_grad_(need_h)  # the autograd twin (and reverse / renormalized KL)
            w_ = weight.detach().requires_grad_(need_w)
            b_ = bias.detach().requires_grad_(need_b) if bias is not None else None
            with torch.enable_grad():
                chunk = term.row_fn(torch.log_softmax(F.linear(h_, w_, b_).float(), dim=-1), sl).sum()
                wrt = [t for t, n in ((h_, need_h), (w_, need_w), (b_, need_b)) if n]
                got = list(torch.autograd.grad(chunk * coef, wrt))
            if need_h:
                grad_h.index_add_(0, idx, got.pop(0).to(grad_h.dtype))
            if need_w:
                grad_w.add_(got.pop(0).float())
            if need_b:
                grad_b.add_(got.pop(0).to(grad_b.dtype))
            total += chunk.detach()
        sums.append(total)
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)  # the one rounding; the fp32 sum is freed here, before backward
    return sums, (grad_h, grad_w, grad_b)


class _HeadLoss(torch.autograd.Function):
    """loss = sum_t coef_t * term_t, with every term's gradient computed in the forward (`_head_pass`) and
    kept until backward: the saved tensors are the one hidden-state gradient and, when the head trains, the
    weight's (and bias's). Returns (loss, *the terms' sums), the sums without gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, coefs, chunk_rows):
        need = tuple(ctx.needs_input_grad[:3])
        sums, grads = _head_pass(hidden, weight, bias, terms, coefs, chunk_rows, need)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.need, ctx.shape = need, hidden.shape
        loss = sum((c * s for c, s in zip(coefs, sums)), torch.zeros((), device=hidden.device))
        ctx.mark_non_differentiable(*sums)
        return (loss, *sums)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        # scaled in place: a second (V, H) head buffer would be 2.1 GB at 70B; so this backward runs once
        if getattr(ctx, "done", False):
            raise RuntimeError("the chunked head loss's backward runs once (its saved gradients are scaled in place): "
                               "do not call backward twice on it (retain_graph)")
        ctx.done = True
        saved, out = iter(ctx.saved_tensors), []
        for i, need in enumerate(ctx.need):
            g = next(saved) if need else None
            out.append(None if g is None else (g.view(ctx.shape) if i == 0 else g).mul_(grad_loss.to(g.dtype)))
        return (*out, None, None, None)


def head_loss(hidden, weight, bias, terms: list, coefs: list[float], chunk_rows: int):
    """(loss, [each term's sum]): the Function when a gradient is wanted (grad mode on and an input that
    requires it), else the sums alone with no gradient work (`ctx.needs_input_grad` follows requires_grad,
    not the grad mode: checked here)."""
    need = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if torch.is_grad_enabled() and any(need):
        loss, *sums = _HeadLoss.apply(hidden, weight, bias, terms, coefs, chunk_rows)
        return loss, sums
    sums, _ = _head_pass(hidden, weight, bias, terms, coefs, chunk_rows, (False, False, False))
    return sum((c * s for c, s in zip(coefs, sums)), torch.zeros((), device=hidden.device)), sums


def selfaug_loss(hidden, weight, bias, labels, rows_b, rows_t, teacher, c_nll: float, c_kl: float, *,
                 reverse: bool = False, tail: str = "bucket", chunk_rows: int = 1024, fused: bool = True,
                 ignore_index: int = -100, nll_rows=None):
    """c_nll * NLL_sum + c_kl * KL_sum of one micro-batch through one chunked pass of the head, and the two
    sums (without gradient). No teacher: the NLL alone (KL sum 0).

    Args:
        hidden: (B, T, H) the decoder's final hidden states.
        weight, bias: (V, H), (V,) or None: the lm_head.
        labels: (B, T) already shifted: labels[b, t] is the token predicted after position t, or ignore_index.
        rows_b, rows_t: (N,) the KL positions, in the teacher's row order.
        teacher: StoredTeacher | SampledTeacher | LiveTeacher with N rows, or None.
        nll_rows: (M,) the flat indices of labels != ignore_index, when known (found here otherwise: a device sync).
    Returns: loss (scalar), nll_sum, kl_sum (scalars, detached)."""
    terms, coefs = [_nll_term(labels, ignore_index, fused, nll_rows)], [c_nll]
    if teacher is not None:
        terms.append(_kl_term(rows_b, rows_t, hidden.shape[1], teacher, reverse, tail, fused))
        coefs.append(c_kl)
    loss, sums = head_loss(hidden, weight, bias, terms, coefs, chunk_rows)
    kl = sums[1] if teacher is not None else torch.zeros((), device=hidden.device)
    return loss, sums[0], kl


def nll_sum(hidden, weight, bias, labels, ignore_index: int = -100, chunk_rows: int = 1024, fused: bool = True):
    """Summed next-token NLL and its token count. hidden (B, T, H); labels (B, T) already shifted:
    labels[b, t] is the token predicted after position t, or ignore_index."""
    term = _nll_term(labels, ignore_index, fused)
    loss, _ = head_loss(hidden, weight, bias, [term], [1.0], chunk_rows)
    return loss, term.rows.numel()


def kl_sum(hidden, weight, bias, rows_b, rows_t, teacher, reverse: bool = False, tail: str = "bucket",
           chunk_rows: int = 1024, fused: bool = True):
    """Summed per-position KL between the teacher and the model, and the position count.
    hidden (B, T, H); rows_b, rows_t (N,): the KL positions; teacher: StoredTeacher | SampledTeacher |
    LiveTeacher with N rows in the same order."""
    term = _kl_term(rows_b, rows_t, hidden.shape[1], teacher, reverse, tail, fused)
    loss, _ = head_loss(hidden, weight, bias, [term], [1.0], chunk_rows)
    return loss, term.rows.numel()


def shifted_labels(input_ids: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t + 1] for t in [P - 1, L - 2] (the response tokens), else ignore."""
    B, T = input_ids.shape
    t = torch.arange(T, device=input_ids.device)[None, :]
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    inside = (t >= (prompt_lens[:, None] - 1)) & (t <= (lengths[:, None] - 2))
    return torch.where(inside, labels, torch.full_like(labels, ignore_index))
