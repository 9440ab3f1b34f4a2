"""
Triton kernels and their PyTorch twins. The project calls only the three dispatchers below: tensors on a
GPU (with Triton installed) go to the kernels, anything else to the twins, through the same call.
"""

from .loss import (HAVE_TRITON, fused_linear_loss, fused_linear_loss_ref, linear_token_stats,
                   linear_token_stats_ref)
from .fisher import per_sample_grad_sq, per_sample_grad_sq_ref


def linear_loss(hidden, weight, targets, loss="ce", ignore_index=-100):
    """Per-token CE or IH [N] fp32 of the logits hidden [N,H] @ weight [V,H]ᵀ; 0 where targets == ignore_index."""
    f = fused_linear_loss if hidden.is_cuda and HAVE_TRITON else fused_linear_loss_ref
    return f(hidden, weight, targets, loss, ignore_index)


def token_stats(hidden, weight, targets, ignore_index=-100):
    """(log p(target) [N] fp32, argmax == target [N] bool), no grad; 0 / False where ignored."""
    f = linear_token_stats if hidden.is_cuda and HAVE_TRITON else linear_token_stats_ref
    return f(hidden, weight, targets, ignore_index)


def grad_sq(x, g):
    """Linear layer inputs x [N,T,in], output grads g [N,T,out] -> (Σ_n (g_nᵀ x_n)² [out,in], ‖g_nᵀ x_n‖² [N])."""
    f = per_sample_grad_sq if x.is_cuda and HAVE_TRITON else per_sample_grad_sq_ref
    return f(x, g)
