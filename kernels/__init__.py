"""
Triton kernels and their PyTorch twins. The project calls only the dispatchers below: tensors on a GPU
(with Triton installed) go to the kernels, anything else to the twins, through the same call.
Under autocast (--dtype bfloat16) the dispatchers give the kernels their inputs in autocast's dtype, as the
model's other matmuls get them, and run them with autocast off: each kernel chooses its own precision
(fp32 logits and accumulation from bf16 inputs), which autocast would otherwise undo.
"""
from contextlib import contextmanager

import torch

from .loss import (HAVE_TRITON, chunk_rows, fused_linear_loss, fused_linear_loss_ref, linear_token_stats,
                   linear_token_stats_ref)
from .kl import fused_linear_kl, fused_linear_kl_ref
from .fisher import per_sample_grad_norms, per_sample_grad_sq, per_sample_grad_sq_ref


@contextmanager
def _own_precision(*tensors):
    """Yields the tensors in autocast's dtype where autocast is on (else as they are), autocast off inside."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
    with torch.autocast(device, enabled=False):
        yield tensors


def linear_loss(hidden, weight, targets, loss="ce", ignore_index=-100, scale=None):
    """Per-token CE or IH [N] fp32 of the logits hidden [N,H] @ weight [V,H]ᵀ; 0 where targets == ignore_index.
    With scale [N] (a constant, e.g. 1/#tokens): the scalar Σ_t scale_t·loss_t instead, its gradients formed
    in the forward (one matmul fewer); without it the backward recomputes the logits, for any upstream grad."""
    f = fused_linear_loss if hidden.is_cuda and HAVE_TRITON else fused_linear_loss_ref
    with _own_precision(hidden, weight) as (hidden, weight):
        return f(hidden, weight, targets, loss, ignore_index, scale)


def linear_kl(hidden, weight, ref_hidden, ref_weight=None, symmetric=False):
    """KL(p_ref ‖ p) per token [N] fp32 of the logits hidden @ weightᵀ (p) and ref_hidden @ ref_weightᵀ
    (p_ref, a constant); ref_weight None or weight itself: a shared projection, one matmul for both.
    symmetric=True: Σ (p_ref − p)(log p_ref − log p), no gradient."""
    f = fused_linear_kl if hidden.is_cuda and HAVE_TRITON else fused_linear_kl_ref
    ref_weight = None if ref_weight is weight else ref_weight  # shared: still one matmul after the cast
    with _own_precision(hidden, weight, ref_hidden, ref_weight) as (hidden, weight, ref_hidden, ref_weight):
        return f(hidden, weight, ref_hidden, ref_weight, symmetric)


def token_stats(hidden, weight, targets, ignore_index=-100):
    """(log p(target) [N] fp32, argmax == target [N] bool), no grad; 0 / False where ignored."""
    f = linear_token_stats if hidden.is_cuda and HAVE_TRITON else linear_token_stats_ref
    with _own_precision(hidden, weight) as (hidden, weight):
        return f(hidden, weight, targets, ignore_index)


def grad_sq(x, g):
    """Linear layer inputs x [N,T,in], output grads g [N,T,out] -> (Σ_n (g_nᵀ x_n)² [out,in], ‖g_nᵀ x_n‖² [N])."""
    f = per_sample_grad_sq if x.is_cuda and HAVE_TRITON else per_sample_grad_sq_ref
    with torch.autocast(x.device.type, enabled=False):  # fp32 accumulation; x and g as the model made them
        return f(x, g)


def grad_norms(x, g):
    """‖g_nᵀ x_n‖²_F [N] alone: the Gram ("ghost norm") form where it is cheaper, else grad_sq's norms."""
    with torch.autocast(x.device.type, enabled=False):
        return per_sample_grad_norms(x, g, grad_sq)
