import pytest
import torch

from autofit.sim.attention import CUDNN, EFFICIENT, FLASH, MATH, select_backend

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def choose(cc, dtype=BF16, d=64, mask=False, dropout=0.0, causal=True, sq=512, sk=512, grad=True, dv=None,
           gqa=False):
    return select_backend(compute_capability=cc, dtype=dtype, head_dim_qk=d, head_dim_v=dv or d, has_mask=mask,
                          dropout=dropout, is_causal=causal, seq_q=sq, seq_k=sk, requires_grad=grad, grouped=gqa)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cc=(8, 6)), FLASH),  # RTX 30xx, bf16, no mask
    (dict(cc=(8, 9), dtype=FP16), FLASH),
    (dict(cc=(8, 6), mask=True), EFFICIENT),  # flash takes no mask
    (dict(cc=(7, 5), dtype=FP16), EFFICIENT),  # flash needs sm80
    (dict(cc=(7, 0), dtype=FP32), EFFICIENT),  # fp32 only runs memory-efficient
    (dict(cc=(8, 6), dtype=FP32), EFFICIENT),
    (dict(cc=(8, 6), d=256, dropout=0.0), FLASH),  # head dim 256 trains on sm86 without dropout
    (dict(cc=(8, 6), d=256, dropout=0.1), EFFICIENT),  # but not with it (and 256 is 8-aligned)
    (dict(cc=(8, 6), d=200), EFFICIENT),  # (192, 224] is out for training on sm86
    (dict(cc=(8, 0), d=200), FLASH),  # fine on sm80
    (dict(cc=(8, 6), d=512), EFFICIENT),  # flash stops at 256
    (dict(cc=(7, 5), dtype=FP16, d=100), MATH),  # 100 is not 8-aligned for fp16 tensor cores
    (dict(cc=(9, 0)), CUDNN),  # Hopper prefers cuDNN
    (dict(cc=(9, 0), dropout=0.1), FLASH),  # cuDNN dropout comes in sixteenths
    (dict(cc=(9, 0), d=96), CUDNN),  # cuDNN backward on sm90 takes d <= 128, (192, 128) or 256: 96 is fine
    (dict(cc=(9, 0), d=160), FLASH),  # 160 is not a cuDNN backward size
    (dict(cc=(12, 0)), FLASH),  # consumer Blackwell: flash first
    (dict(cc=(8, 6), causal=True, sq=1, sk=512), EFFICIENT),  # flash's causal flag needs square masks
    # grouped-query heads (enable_gqa): memory-efficient never takes them; flash and cuDNN do
    (dict(cc=(8, 6), gqa=True), FLASH),
    (dict(cc=(8, 6), dtype=FP32, gqa=True), MATH),
    (dict(cc=(7, 5), dtype=FP16, gqa=True), MATH),  # a T4 or RTX 20xx training a GQA model under 16-mixed
    (dict(cc=(9, 0), gqa=True), CUDNN),
])
def test_backend_selection(kwargs, expected):
    assert choose(**kwargs) == expected


@pytest.mark.parametrize("card, precision", [("t4", None), ("rtx3060", "32-true")])
def test_grouped_query_models_simulate_where_flash_cannot_run(card, precision):
    # SmolLM2-360M has 15 query heads over 5 key heads: on a T4 (no flash before sm80) or in fp32 the efficient kernel
    # would be next, but it does not take grouped heads, so math runs; before, the simulation failed here and the
    # estimate fell back to the analytic formula
    from autofit import memory

    est = memory.estimate("HuggingFaceTB/SmolLM2-360M", card, batch_size=2, seq_len=256, method="lora",
                          precision=precision)
    assert est.source == "simulation" and est.attention_kernel == "math"
