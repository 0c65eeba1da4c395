"""Quantized linear layers as bitsandbytes lays them out in memory, for simulation without bitsandbytes.

``Linear4bit`` stores an NF4 weight with double quantization exactly as bitsandbytes does (bitsandbytes 0.50,
``nn/modules.py`` and ``functional.py``): the weight packed two values per byte in a ``(ceil(n/2), 1)`` uint8 tensor,
one uint8 absmax per 64-value block, one fp32 absmax per 256 of those blocks, a 256-entry fp32 code for them and a
16-entry fp32 NF4 code. That is 0.5 + 1/64 + 1/4096 bytes per weight, about 0.516. Its forward and backward allocate
what bitsandbytes' ``MatMul4Bit`` allocates on CUDA for training-sized inputs: the input cast to the compute dtype, a
dequantized fp32 absmax and a dequantized weight (``_dequant_linear_fallback``), and in backward the weight
dequantized again to compute the input's gradient. ``Linear8bitLt`` stores an int8 weight with one fp32 scale per
row and allocates what ``MatMul8bitLt`` does: an fp16 copy of the input, its int8 quantization and row scales, an
int32 product, and in backward the weight dequantized to the input's dtype.

The layers compute nothing meaningful: they exist so a simulated step allocates what a real one would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autofit.sim import arch

BLOCK = 64  # bitsandbytes' default 4-bit blocksize
NESTED_BLOCK = 256  # blocksize of the double-quantized absmax


class _MatMul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, layer):
        ctx.layer = layer
        absmax = torch.empty(layer.absmax.shape, dtype=torch.float32, device=x.device)
        weight = torch.empty((layer.out_features, layer.in_features), dtype=x.dtype, device=x.device)
        out = F.linear(x, weight, bias)
        del absmax, weight
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        absmax = torch.empty(layer.absmax.shape, dtype=torch.float32, device=grad_out.device)
        weight = torch.empty((layer.out_features, layer.in_features), dtype=layer.storage_dtype, device=grad_out.device)
        del absmax
        grad_x = torch.matmul(grad_out, weight.to(grad_out.dtype))
        return grad_x, None, None, None


class Linear4bit(nn.Linear):
    """A frozen NF4 linear layer with bitsandbytes' storage (an ``nn.Linear`` so peft adapts it as it would
    bitsandbytes' ``Linear4bit``)."""

    def __init__(self, in_features, out_features, bias, *, compute_dtype, storage_dtype, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.storage_dtype = compute_dtype, storage_dtype
        n = in_features * out_features
        blocks = -(-n // BLOCK)
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), requires_grad=False)
        self.weight.logical_numel = n
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device), persistent=False)
        self.register_buffer("absmax2", torch.empty(-(-blocks // NESTED_BLOCK), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=storage_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _MatMul4bit.apply(x, self.weight, bias, self).to(in_dtype)


class _MatMul8bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer, ctx.in_shape, ctx.in_dtype = layer, x.shape, x.dtype
        a = x.reshape(-1, x.shape[-1])
        a16 = a.to(torch.float16)
        quantized = torch.empty(a.shape, dtype=torch.int8, device=x.device)
        row_scales = torch.empty(a.shape[0], dtype=torch.float32, device=x.device)
        del a16
        product = torch.empty((a.shape[0], layer.out_features), dtype=torch.int32, device=x.device)
        out = torch.empty((a.shape[0], layer.out_features), dtype=x.dtype, device=x.device)
        del quantized, row_scales, product
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        weight = layer.weight.to(ctx.in_dtype, copy=True)
        scale = layer.scb.unsqueeze(1).mul(1.0 / 127.0)
        weight.mul_(scale)
        del scale
        grad_x = torch.matmul(grad.to(ctx.in_dtype), weight).view(ctx.in_shape)
        return grad_x, None, None, None


class Linear8bitLt(nn.Linear):
    """A frozen LLM.int8 linear layer with bitsandbytes' storage: int8 weight plus one fp32 scale per output row."""

    def __init__(self, in_features, out_features, bias, *, storage_dtype, device=None, **_):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.storage_dtype = storage_dtype
        self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=torch.int8, device=device), requires_grad=False)
        self.register_buffer("scb", torch.empty(out_features, dtype=torch.float32, device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=storage_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return _MatMul8bit.apply(x, self.weight, self.bias, self)


def _linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, has_bias) of an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), else None."""
    if isinstance(module, (Linear4bit, Linear8bitLt)):
        return None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def _quantizable_linears(model: nn.Module):
    """(parent, name, child, (in, out, has_bias)) for every linear layer but the output head, as transformers'
    bitsandbytes integration swaps them; a list, so the caller may replace children while walking it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a task head (BERT-style "classifier", "score") stays unquantized too: transformers keeps the model's last
    # module out of the conversion, and peft trains the head in full (modules_to_save), which a quantized one cannot
    task_heads = {id(m) for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module)
                  for m in getattr(model, name).modules()}
    # and so do the modules a model keeps in fp32 (T5's feed-forward output "wo"), which transformers leaves out
    # of the conversion (HfQuantizer.get_modules_to_not_convert)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    found = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            shape = _linear_shape(child)
            if shape is not None and child is not head and id(child) not in task_heads and name not in keep:
                found.append((parent, name, child, shape))
    return found


def quantize_linears(model: nn.Module, bits: str, *, compute_dtype: torch.dtype) -> int:
    """Replaces the linear layers of ``model`` (on meta) by simulated ``bits`` ("4bit"/"8bit") layers, as
    transformers' bitsandbytes integration does: every linear layer but the output head. Returns how many."""
    cls = Linear4bit if bits == "4bit" else Linear8bitLt
    linears = _quantizable_linears(model)
    for parent, name, child, (d_in, d_out, has_bias) in linears:
        setattr(parent, name, cls(d_in, d_out, has_bias, compute_dtype=compute_dtype,
                                  storage_dtype=child.weight.dtype, device=child.weight.device))
    return len(linears)


def upcast_non_quantized(model: nn.Module) -> None:
    """The rest of a k-bit model as autofit trains it, all frozen: normalization weights in fp32, embeddings and the
    output head left 16-bit. This follows the QLoRA reference code (github.com/artidoro/qlora, ``qlora.py``: norms to
    fp32, ``lm_head``/``embed_tokens`` to bf16), not ``peft.prepare_model_for_kbit_training``, which upcasts every
    16-bit parameter and so costs 2 bytes per embedding and head weight more (4 GiB for Llama-3's 128k vocabulary)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    keep = {id(p) for m in (head, embeddings) if m is not None for p in m.parameters()}
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
            if is_norm and id(p) not in keep and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)


def logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter holds (a packed 4-bit tensor holds two per byte)."""
    return getattr(p, "logical_numel", p.numel())


def storage_name(p: torch.Tensor) -> str:
    """How a parameter is stored: ``nf4`` for packed 4-bit weights, else the dtype's name (``int8``, ``bfloat16``)."""
    if hasattr(p, "logical_numel"):
        return "nf4"
    return str(p.dtype).removeprefix("torch.")


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (Linear4bit, Linear8bitLt))


def lora_forward_4bit(self, x, *args, **kwargs):
    """peft's LoRA forward over a bitsandbytes 4-bit layer (peft/tuners/lora/bnb.py, ``Linear4bit.forward``):
    the base output is cloned, and the adapter's input and output are cast only when autocast is off."""
    result = self.base_layer(x, *args, **kwargs).clone()
    return _add_adapters(self, x, result)


def lora_forward_8bit(self, x, *args, **kwargs):
    """peft's LoRA forward over a bitsandbytes 8-bit layer (no clone, casts only when autocast is off)."""
    return _add_adapters(self, x, self.base_layer(x, *args, **kwargs))


def _add_adapters(self, x, result):
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        convert = not torch.is_autocast_enabled()
        if convert:
            expected = result.dtype
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        out = lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]
        if convert:
            out = out.to(expected)
        result = result + out
    return result


def use_bnb_lora_forward(model: nn.Module) -> None:
    """Gives each peft LoRA layer over a simulated quantized layer the forward peft uses for bitsandbytes layers."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if hasattr(module, "lora_A") and isinstance(base, Linear4bit):
            module.forward = lora_forward_4bit.__get__(module)
        elif hasattr(module, "lora_A") and isinstance(base, Linear8bitLt):
            module.forward = lora_forward_8bit.__get__(module)


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports here (it is an optional extra: ``pip install autofit[quant]``)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # missing, or built for another CUDA
        return False
    return True


def build_bnb_model(spec, cfg, device: str) -> nn.Module:
    """The model ``cfg`` trains, with real bitsandbytes 4- or 8-bit layers on ``device``: random 16-bit weights made
    on the host, every linear layer but the head swapped for bitsandbytes' and quantized as it moves to the device
    (as ``from_pretrained(quantization_config=...)`` does), norms upcast, peft LoRA adapters on top."""
    import bitsandbytes as bnb

    model = arch.build(spec.config, dtype=cfg.half, task=spec.task, device="cpu")
    for parent, name, child, (d_in, d_out, has_bias) in _quantizable_linears(model):
        weight = child.weight.data if isinstance(child, nn.Linear) else child.weight.data.t().contiguous()
        if cfg.quantization == "4bit":
            new = bnb.nn.Linear4bit(d_in, d_out, bias=has_bias, compute_dtype=cfg.half, compress_statistics=True,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(d_in, d_out, bias=has_bias, has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        setattr(parent, name, new)
    upcast_non_quantized(model)
    model = model.to(device)
    targets = cfg.lora_targets or spec.lora_targets
    return arch.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha or 2 * cfg.lora_r, dropout=cfg.lora_dropout,
                             targets=targets, device=device, task=spec.task)
