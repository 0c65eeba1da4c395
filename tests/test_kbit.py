import torch

from autofit.sim import kbit
from tests.conftest import tiny_llama


def _storage_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def test_nf4_storage_is_about_0516_bytes_per_weight():
    layer = kbit.Linear4bit(4096, 4096, False, compute_dtype=torch.bfloat16, storage_dtype=torch.bfloat16,
                            device="meta")
    n = 4096 * 4096
    # packed weights, one uint8 absmax per 64, one fp32 absmax per 256 blocks, the two codes and the offset
    expected = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 256 + 4 + 4 * 16
    assert _storage_bytes(layer) == expected
    assert abs(_storage_bytes(layer) / n - 0.516) < 0.001
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (n // 2, 1)


def test_int8_storage():
    layer = kbit.Linear8bitLt(1024, 512, True, storage_dtype=torch.bfloat16, device="meta")
    assert _storage_bytes(layer) == 1024 * 512 + 4 * 512 + 2 * 512


def test_quantize_replaces_every_linear_but_the_head():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama(layers=2), dtype=torch.bfloat16)
    replaced = kbit.quantize_linears(model, "4bit", compute_dtype=torch.bfloat16)
    assert replaced == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not kbit.is_quantized(model.lm_head)
    kbit.upcast_non_quantized(model)
    assert model.model.norm.weight.dtype == torch.float32  # norms in fp32
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16  # 16-bit, as QLoRA
    assert {p.dtype for p in model.parameters()} == {torch.uint8, torch.float32, torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_4bit_layer_runs_forward_and_backward():
    layer = kbit.Linear4bit(16, 8, True, compute_dtype=torch.bfloat16, storage_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 3, 8) and out.dtype == torch.float32  # cast back to the input's dtype
    out.float().sum().backward()
    assert x.grad.shape == x.shape
