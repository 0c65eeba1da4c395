import pytest
import torch
import torch.nn.functional as F

from autofit.sim.cuda_autocast import CUDA_POLICY, CudaAutocast, registered_ops


def test_table_knows_every_op_cuda_autocast_handles():
    # a PyTorch that adds an op to CUDA's autocast lists fails here instead of simulating it wrongly
    assert registered_ops("AutocastCUDA") <= set(CUDA_POLICY)


def test_cuda_policy_on_cpu_tensors_and_restoration():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(8, 8, requires_grad=True)
    with CudaAutocast().installed() as ac, ac.region(torch.bfloat16):
        assert torch.pow(x, 3.0).dtype == torch.float32  # fp32 on CUDA (GPT-2's GELU), not on CPU
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert F.rms_norm(x, (8,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32  # fp32_set_opt_dtype
        assert x.sum().dtype == torch.float32
        assert torch.norm(x).dtype == torch.float32  # fp32_append_dtype
        assert F.linear(x.float(), w).dtype == torch.bfloat16  # lower precision on both
        assert torch.cat([x, x.float()]).dtype == torch.float32  # no CUDA policy: ordinary type promotion
        assert torch.addcmul(x, x.float(), x).dtype == torch.float32  # promote
        assert x.tanh().dtype == torch.bfloat16  # not on any list
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU's own policy is back
        assert torch.pow(x, 3.0).dtype == torch.bfloat16
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_weight_casts_are_cached_within_a_region():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(2, 8)
    with CudaAutocast().installed() as ac, ac.region(torch.bfloat16):
        a, b = torch.einsum("ij,jk->ik", x, w), torch.einsum("ij,jk->ik", x, w)  # einsum: CUDA-only lower policy
        assert a.dtype == b.dtype == torch.bfloat16
        cache = ac._cache._entries
        assert len(cache) == 1 and next(iter(cache.values()))[1].dtype == torch.bfloat16
    assert not ac._cache._entries


def test_binary_cross_entropy_is_banned_as_on_cuda():
    with CudaAutocast().installed() as ac, ac.region(torch.float16):
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(torch.rand(4), torch.rand(4))
