"""Plain PyTorch DeepSeek-V3 MoE pieces in float64: the truth the kernels are tested against."""

from __future__ import annotations

import functools

import torch

from r1kernels.fp8 import reference as fp8_reference


def route(logits, correction_bias=None, *, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0,
          norm_topk_prob=True, score_func="sigmoid", ids=None):  # fmt: skip
    """(weights [T, k] float64, ids [T, k] int64): experts in descending biased score, ties to the lower id.
    ``ids`` given ([T, k]): these experts' weights, no choice made (validation pins the discrete choice to the
    kernel path's, so that a near-tie broken the other way by a last-bit difference upstream is not an error)."""
    lg = logits.double()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    if ids is not None:
        return _weights(scores, ids.long(), routed_scaling_factor, norm_topk_prob), ids.long()
    choice = scores + (correction_bias.double() if correction_bias is not None else 0.0)
    T, E = choice.shape
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        # stable sort on the negated score: equal scores keep ascending group order
        keep = torch.argsort(-group_scores, dim=-1, stable=True)[:, :topk_group]
        mask = torch.zeros(T, n_group, dtype=torch.bool, device=lg.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.argsort(-choice, dim=-1, stable=True)[:, :top_k]
    return _weights(scores, ids, routed_scaling_factor, norm_topk_prob), ids


def _weights(scores, ids, routed_scaling_factor, norm_topk_prob):
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


def permutation_index(expert_ids, num_experts, align=1):
    """(counts, offsets, row_of, source, row_expert) by a plain loop over experts and slots in order."""
    flat = expert_ids.reshape(-1).tolist()
    counts = [0] * num_experts
    for e in flat:
        if e >= 0:
            counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + -(-c // align) * align)
    row_of = [-1] * len(flat)
    source = [-1] * offsets[-1]
    row_expert = [-1] * offsets[-1]
    for e in range(num_experts):
        r = offsets[e]
        for slot, slot_expert in enumerate(flat):
            if slot_expert == e:
                row_of[slot], source[r], row_expert[r] = r, slot, e
                r += 1
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64)
    return (as_tensor(counts), as_tensor(offsets), as_tensor(row_of).view(expert_ids.shape), as_tensor(source),
            as_tensor(row_expert))  # fmt: skip


def permute(x, source, top_k):
    """Row r = x[source[r] // k] in float64, zeros on padding (source -1)."""
    out = torch.zeros(source.shape[0], x.shape[1], dtype=torch.float64)
    for r, s in enumerate(source.tolist()):
        if s >= 0:
            out[r] = x[s // top_k].double()
    return out


def unpermute(rows, row_of, weights):
    """Token t = sum_j weights[t, j] * rows[row_of[t, j]] in float64 over routed slots."""
    out = torch.zeros(row_of.shape[0], rows.shape[1], dtype=torch.float64)
    for t in range(row_of.shape[0]):
        for j in range(row_of.shape[1]):
            r = int(row_of[t, j])
            if r >= 0:
                out[t] += weights[t, j].double() * rows[r].double()
    return out


def grouped_linear(x, weight, row_expert):
    """Row r = x[r] @ weight[row_expert[r]].T in float64; zero rows where row_expert is -1."""
    out = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64)
    for r, e in enumerate(row_expert.tolist()):
        if e >= 0:
            out[r] = x[r].double() @ weight[e].double().T
    return out


def routed_experts(x, weights, ids, gate_up_proj, down_proj, fp8: bool = False):
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]), expert by expert (HF's eager loop): expert(x) =
    down @ (silu(gate @ x) * (up @ x)), gate / up the two halves of gate_up_proj; differentiable.

    Each product and the SwiGLU are computed in float64, and each result is rounded to x's dtype where the
    layer stores a tensor (projection outputs, the SwiGLU activations, each expert's output rows before they
    are weighted and summed; autograd rounds the gradients at the same points). In bf16 this makes the
    comparison measure the kernels' arithmetic rather than bf16 storage, which both paths share; in fp32
    it changes nothing that matters. Returns ``[T, H]`` float64.

    ``fp8``: each product on FP8 operands, DeepSeek-V3's recipe on the kernels' tiles
    (``r1kernels.fp8.reference.fp8_linear``); an expert's rows are in token order with its 128-token tiles
    starting at its first row, as the 128-aligned segments of ``fp8_grouped_linear`` lay them out."""
    dtype = x.dtype

    def linear(a, w):  # float64 result, stored in x's dtype as the grouped GEMM stores it
        y = fp8_reference.fp8_linear(a, w) if fp8 else a.double() @ w.double().T
        return y.to(dtype).double()

    out = torch.zeros(x.shape[0], down_proj.shape[1], dtype=torch.float64, device=x.device)
    inter = gate_up_proj.shape[1] // 2
    for e in torch.unique(ids[ids >= 0]).tolist():
        rows, slots = torch.nonzero(ids == e, as_tuple=True)
        h = linear(x[rows], gate_up_proj[e])
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(dtype)
        y = linear(act, down_proj[e])
        out = out.index_add(0, rows, y * weights[rows, slots, None].double())
    return out
