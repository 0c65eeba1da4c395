"""CUDA's autocast policy, applied to CPU tensors.

Autocast decides which ops run in 16-bit and which in fp32, and CUDA's lists differ from the CPU's: on CUDA ``pow``,
``softmax``, ``layer_norm`` and ``rms_norm`` run in fp32, which changes the dtype (and so the size) of activations a
model saves for backward, GPT-2's GELU among them. The simulation runs on fake CPU tensors, so while it runs the CPU
autocast kernels are replaced by Python kernels that follow CUDA's policy; leaving the context restores them.

The policy lists are facts from PyTorch's ``aten/src/ATen/autocast_mode.h`` and ``autocast_mode.cpp``
(``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE`` and the ``AutocastCPU`` block); which ops carry a
CUDA autocast kernel in the installed PyTorch is read at run time from the dispatcher, so a test notices when a new
PyTorch adds an op this table does not know.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator

import torch

_AUTOCAST_CPU = torch._C.DispatchKey.AutocastCPU

# Policy of each op (``name`` or ``name.overload``) under CUDA autocast.
CUDA_POLICY: dict[str, str] = {}
for _name in (
    "_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d.input "
    "conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm "
    "bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell "
    "rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention cudnn_convolution "
    "cudnn_convolution_transpose"
).split():
    CUDA_POLICY[_name] = "lower"
for _name in (
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar "
    "pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm frobenius_norm.dim nuclear_norm "
    "nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d "
    "hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
    "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits "
    "dist pdist cdist renorm logsumexp rms_norm upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d "
    "_upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d "
    "_upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa"
).split():
    CUDA_POLICY[_name] = "fp32"
for _name in (
    "prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int log_softmax.Dimname cumprod "
    "cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm linalg_matrix_norm.str_ord sum "
    "sum.dim_IntList sum.dim_DimnameList"
).split():
    CUDA_POLICY[_name] = "fp32_set_opt_dtype"
for _name in "norm.Scalar norm.ScalarOpt_dim norm.names_ScalarOpt_dim".split():
    CUDA_POLICY[_name] = "fp32_append_dtype"
for _name in "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add".split():
    CUDA_POLICY[_name] = "promote"
CUDA_POLICY["binary_cross_entropy"] = "banned"

# The CPU policy, where it matches CUDA's the CPU kernel (and its weight-cast cache) is kept as is.
_CPU_LOWER = set(
    "conv1d conv1d.padding conv2d conv2d.padding conv3d conv3d.padding bmm mm linalg_vecdot baddbmm addmm "
    "_addmm_activation addbmm linear _convolution.deprecated matmul conv_tbc mkldnn_rnn_layer conv_transpose1d "
    "conv_transpose2d.input conv_transpose3d.input prelu scaled_dot_product_attention _native_multi_head_attention".split()
)


def _name_of(qualified: str) -> str:
    """``aten::pow.Tensor_Scalar`` -> ``pow.Tensor_Scalar``; ``aten::linear`` -> ``linear``."""
    return qualified.split("::", 1)[1]


def registered_ops(key: str) -> set[str]:
    """Names of the aten ops with a kernel for autocast dispatch key ``key`` (``AutocastCUDA``, ``AutocastCPU``)."""
    return {_name_of(n) for n in torch._C._dispatch_get_registrations_for_dispatch_key(key) if n.startswith("aten::")}


def _overload(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(t) -> bool:
    # at::autocast::is_eligible: a defined floating-point tensor on the autocast device that is not fp64
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64


class _CastCache:
    """The weight-cast cache of ``cached_cast``: fp32 leaf tensors that require grad are cast once per region."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not _eligible(t) or t.dtype is dtype:
            return t
        cacheable = (
            dtype is torch.get_autocast_dtype("cpu") and t.dtype is torch.float32 and t.requires_grad
            and t.is_leaf and not t._is_view() and torch.is_autocast_cache_enabled()
        )
        if not cacheable:
            return t.to(dtype)
        hit = self._entries.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        cast = t.to(dtype)
        self._entries[id(t)] = (weakref.ref(t), cast)
        return cast

    def clear(self) -> None:
        self._entries.clear()


def _map_tensors(fn, values):
    out = []
    for v in values:
        if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
            out.append(type(v)(fn(x) if isinstance(x, torch.Tensor) else x for x in v))
        else:
            out.append(fn(v) if isinstance(v, torch.Tensor) else v)
    return out


def _tensors(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, torch.Tensor))


def _kernel(op: torch._ops.OpOverload, policy: str, cache: _CastCache):
    """A Python AutocastCPU kernel for ``op`` that follows CUDA's ``policy``."""
    schema_args = op._schema.arguments
    dtype_index = next((i for i, a in enumerate(schema_args) if a.name == "dtype"), None)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_AUTOCAST_CPU)):
            lower = torch.get_autocast_dtype("cpu")
            if policy == "lower":
                args = _map_tensors(lambda t: cache.cast(t, lower), args)
                kwargs = dict(zip(kwargs, _map_tensors(lambda t: cache.cast(t, lower), kwargs.values())))
            elif policy == "fp32":
                args = _map_tensors(lambda t: t.float() if _eligible(t) else t, args)
                kwargs = dict(zip(kwargs, _map_tensors(lambda t: t.float() if _eligible(t) else t, kwargs.values())))
            elif policy == "fp32_set_opt_dtype":
                if args and _eligible(args[0]) and dtype_index is not None:
                    if schema_args[dtype_index].kwarg_only or dtype_index >= len(args):
                        if kwargs.get("dtype") is None:
                            kwargs = {**kwargs, "dtype": torch.float32}
                    elif args[dtype_index] is None:
                        args = (*args[:dtype_index], torch.float32, *args[dtype_index + 1 :])
            elif policy == "promote":
                widest = lower
                for t in _tensors(args, kwargs):
                    if _eligible(t):
                        widest = torch.promote_types(widest, t.dtype)
                args = _map_tensors(lambda t: t.to(widest) if _eligible(t) else t, args)
                kwargs = dict(zip(kwargs, _map_tensors(lambda t: t.to(widest) if _eligible(t) else t, kwargs.values())))
            elif policy == "banned":
                raise RuntimeError(f"{op} is unsafe to autocast on CUDA; use binary_cross_entropy_with_logits")
            return op(*args, **kwargs)

    return kernel


def _norm_kernel(name: str):
    """``norm`` redispatches to its dtype overload with fp32 appended (CUDA's fp32_append_dtype)."""
    target = torch.ops.aten.norm.ScalarOpt_dtype if name == "norm.Scalar" else torch.ops.aten.norm.ScalarOpt_dim_dtype

    def kernel(self, *rest):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_AUTOCAST_CPU)):
            out_type = torch.float32 if _eligible(self) else self.dtype
            return target(self, *rest, dtype=out_type)

    return kernel


class CudaAutocast:
    """CPU autocast that casts exactly as CUDA autocast would.

    ``installed()`` swaps CUDA's policy in for the CPU's for as long as it is open (once per simulation: installing
    costs milliseconds per op); ``region(dtype)`` is an autocast region like ``torch.autocast("cuda", dtype)``, one
    per forward pass, clearing the weight-cast cache when it closes as CUDA's does.
    """

    def __init__(self) -> None:
        self._cache = _CastCache()

    @contextlib.contextmanager
    def installed(self) -> Iterator["CudaAutocast"]:
        lib = torch.library.Library("aten", "IMPL")
        try:
            self._register(lib)
            yield self
        finally:
            self._cache.clear()
            lib._destroy()

    def _register(self, lib) -> None:
        # overriding the CPU kernels is the point, so PyTorch's warning about it says nothing new
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpu_ops = registered_ops("AutocastCPU")
            for name in sorted(registered_ops("AutocastCUDA") | cpu_ops):
                policy = CUDA_POLICY.get(name)
                if policy == "lower" and name in _CPU_LOWER:
                    continue  # same policy on both: keep the CPU kernel and its cast cache
                if policy is None:
                    if name in cpu_ops:
                        lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
                    continue
                if policy == "fp32_append_dtype":
                    if name in ("norm.Scalar", "norm.ScalarOpt_dim"):
                        lib.impl(name, _norm_kernel(name), "AutocastCPU")
                    continue
                lib.impl(name, _kernel(_overload(name), policy, self._cache), "AutocastCPU")

    @contextlib.contextmanager
    def region(self, dtype: torch.dtype) -> Iterator[None]:
        try:
            with torch.autocast("cpu", dtype=dtype):
                yield
        finally:
            self._cache.clear()
