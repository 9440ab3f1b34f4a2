"""
Triton kernels and their PyTorch twins. The project calls only the dispatchers below: tensors on a GPU
(with Triton installed) go to the kernels, anything else to the twins, through the same call.
"""

from .loss import (HAVE_TRITON, chunk_rows, fused_linear_loss, fused_linear_loss_ref, linear_token_stats,
                   linear_token_stats_ref)
from .kl import fused_linear_kl, fused_linear_kl_ref
from .fisher import per_sample_grad_norms, per_sample_grad_sq, per_sample_grad_sq_ref


def linear_loss(hidden, weight, targets, loss="ce", ignore_index=-100, scale=None):
    """Per-token CE or IH [N] fp32 of the logits hidden [N,H] @ weight [V,H]ᵀ; 0 where targets == ignore_index.
    With scale [N] (a constant, e.g. 1/#tokens): the scalar Σ_t scale_t·loss_t instead, its gradients formed
    in the forward (one matmul fewer); without it the backward recomputes the logits, for any upstream grad."""
    f = fused_linear_loss if hidden.is_cuda and HAVE_TRITON else fused_linear_loss_ref
    return f(hidden, weight, targets, loss, ignore_index, scale)


def linear_kl(hidden, weight, ref_hidden, ref_weight=None, symmetric=False):
    """KL(p_ref ‖ p) per token [N] fp32 of the logits hidden @ weightᵀ (p) and ref_hidden @ ref_weightᵀ
    (p_ref, a constant); ref_weight None or weight itself: a shared projection, one matmul for both.
    symmetric=True: Σ (p_ref − p)(log p_ref − log p), no gradient."""
    f = fused_linear_kl if hidden.is_cuda and HAVE_TRITON else fused_linear_kl_ref
    return f(hidden, weight, ref_hidden, ref_weight, symmetric)


def token_stats(hidden, weight, targets, ignore_index=-100):
    """(log p(target) [N] fp32, argmax == target [N] bool), no grad; 0 / False where ignored."""
    f = linear_token_stats if hidden.is_cuda and HAVE_TRITON else linear_token_stats_ref
    return f(hidden, weight, targets, ignore_index)


def grad_sq(x, g):
    """Linear layer inputs x [N,T,in], output grads g [N,T,out] -> (Σ_n (g_nᵀ x_n)² [out,in], ‖g_nᵀ x_n‖² [N])."""
    f = per_sample_grad_sq if x.is_cuda and HAVE_TRITON else per_sample_grad_sq_ref
    return f(x, g)


def grad_norms(x, g):
    """‖g_nᵀ x_n‖²_F [N] alone: the Gram ("ghost norm") form where it is cheaper, else grad_sq's norms."""
    return per_sample_grad_norms(x, g, grad_sq)
