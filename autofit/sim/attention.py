"""The attention kernel CUDA would pick for an SDPA call, run on fake CPU tensors.

``torch.nn.functional.scaled_dot_product_attention`` chooses its kernel at run time from the device, dtype, head size
and mask. On CPU it would choose CPU kernels whose saved tensors differ from CUDA's, so while a simulation runs the
function is replaced by one that applies CUDA's selection rules for the target card and calls the chosen CUDA kernel's
aten op directly; those ops run on fake CPU tensors and their shapes (outputs, log-sum-exp) are CUDA's.

The rules are facts from PyTorch's ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` (PyTorch 2.13):
priority cuDNN > flash > memory-efficient > math on sm90/sm100 with cuDNN newer than 9.15 (``check_prefer_cudnn_
attention``; the PyTorch 2.13 CUDA wheels ship such a cuDNN), flash > memory-efficient > math > cuDNN elsewhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

FLASH, EFFICIENT, CUDNN, MATH = "flash", "efficient", "cudnn", "math"


def select_backend(
    *,
    compute_capability: tuple[int, int],
    dtype: torch.dtype,
    head_dim_qk: int,
    head_dim_v: int,
    has_mask: bool,
    dropout: float,
    is_causal: bool,
    seq_q: int,
    seq_k: int,
    requires_grad: bool,
    grouped: bool = False,
) -> str:
    """The SDPA backend PyTorch 2.13 picks on a card of ``compute_capability`` (see sdp_utils.cpp). ``grouped``:
    the key has fewer heads than the query (grouped-query attention with ``enable_gqa``)."""
    major, minor = compute_capability
    half = dtype in (torch.float16, torch.bfloat16)
    dtype_ok_sm = dtype is torch.float16 or (dtype is torch.bfloat16 and major >= 8)

    def flash_ok() -> bool:
        if has_mask or head_dim_qk != head_dim_v or head_dim_qk > 256:
            return False
        if not ((8, 0) <= (major, minor) <= (12, 1)) or not (half and dtype_ok_sm):
            return False
        # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120
        if requires_grad and ((8, 6) <= (major, minor) <= (8, 9) or (12, 0) <= (major, minor) <= (12, 1)):
            if not (head_dim_qk <= 192 or (dropout == 0.0 and head_dim_qk > 224)):
                return False
        return not (is_causal and seq_q != seq_k)

    def efficient_ok() -> bool:
        if not ((5, 0) <= (major, minor) <= (12, 1)):
            return False
        # its dense constraints use check_batch_size_and_num_heads_dense<false /*supports_grouped_query_attention*/>:
        # grouped-query inputs go to math unless flash or cuDNN (whose constraints admit them) take them
        if grouped:
            return False
        # minimum_gemm_alignment: 4 from sm80 on, and 128 bits when tensor cores are used
        tensor_cores = major >= 8 or (major >= 7 and half)
        alignment = max(4 if major >= 8 else 1, (128 // (16 if half else 32)) if tensor_cores else 1)
        if head_dim_qk % alignment or head_dim_v % alignment:
            return False
        allowed = (torch.float16, torch.float32, torch.bfloat16) if major >= 8 else (torch.float16, torch.float32)
        return dtype in allowed

    def cudnn_ok() -> bool:
        if not ((8, 0) <= (major, minor) <= (12, 1)) or not (half and dtype_ok_sm):
            return False
        if dropout * 16.0 != math.floor(dropout * 16.0) or head_dim_qk % 8 or head_dim_v % 8:
            return False
        sm90_or_10x = (major == 9 and minor == 0) or major == 10
        limit = 256 if sm90_or_10x else 128
        if head_dim_qk > limit or head_dim_v > limit or seq_k == 1:
            return False
        if requires_grad and sm90_or_10x and not (
            (head_dim_qk <= 128 and head_dim_v <= 128) or (head_dim_qk, head_dim_v) in ((192, 128), (256, 256))
        ):
            return False
        return True

    prefer_cudnn = (major == 9 and minor == 0) or major == 10
    order = (CUDNN, FLASH, EFFICIENT, MATH) if prefer_cudnn else (FLASH, EFFICIENT, MATH, CUDNN)
    checks = {FLASH: flash_ok, EFFICIENT: efficient_ok, CUDNN: cudnn_ok, MATH: lambda: True}
    return next(name for name in order if checks[name]())


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # convert_boolean_attn_mask: a new additive mask of the query's dtype (0 where attended, -inf elsewhere)
    if mask.dtype is torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


def _padded_mask(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # preprocess_mask for the memory-efficient kernel: the last dim padded to a multiple of 16, then broadcast
    last = mask.shape[-1]
    if last % 16:
        mask = F.pad(mask, (0, 16 - last % 16))[..., :last]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@contextlib.contextmanager
def cuda_sdpa(compute_capability: tuple[int, int], chosen: list[str] | None = None) -> Iterator[None]:
    """Routes ``F.scaled_dot_product_attention`` to the kernel CUDA would choose on ``compute_capability``.

    Each choice is appended to ``chosen`` when given, so a simulation can report which kernel it used.
    """
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not (query.dim() == key.dim() == value.dim() == 4):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if torch.is_autocast_enabled("cpu"):
            # scaled_dot_product_attention is on CUDA autocast's lower-precision list: every floating input is cast,
            # then the kernel runs with autocast off
            low = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(low) if t.is_floating_point() else t for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(low)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return _run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def _run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        backend = select_backend(
            compute_capability=compute_capability,
            dtype=query.dtype,
            head_dim_qk=query.shape[-1],
            head_dim_v=value.shape[-1],
            has_mask=attn_mask is not None,
            dropout=dropout_p,
            is_causal=is_causal,
            seq_q=query.shape[-2],
            seq_k=key.shape[-2],
            requires_grad=torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
            grouped=enable_gqa and key.shape[-3] != query.shape[-3],
        )
        if chosen is not None:
            chosen.append(backend)
        aten = torch.ops.aten
        if backend == FLASH:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if backend == CUDNN:
            mask = None if attn_mask is None else _float_mask(attn_mask, query.dtype)
            return aten._scaled_dot_product_cudnn_attention(
                query, key, value, mask, True, dropout_p, is_causal, False, scale=scale
            )[0]
        if backend == EFFICIENT:
            mask = None if attn_mask is None else _padded_mask(_float_mask(attn_mask, query.dtype), query, key)
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, mask, True, dropout_p, is_causal, scale=scale
            )[0]
        mask = None if attn_mask is None else _float_mask(attn_mask, query.dtype)
        return aten._scaled_dot_product_attention_math(
            query, key, value, mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
        )[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
