"""Curvature of the mean cross-entropy as a linear operator.

``HessianOperator`` multiplies the Hessian (or the generalised Gauss–Newton
matrix) of ``L(θ) = (1/N) Σ_i CE(f_θ(x_i), y_i)`` with vectors, chunk by chunk,
without ever forming the matrix. There is one product implementation:
double-backward through a per-chunk first-order graph. While the graphs fit
``cache_bytes`` they are kept and reused by every later matvec, which makes a
product cost about one backward pass (measured 1.2× a gradient here, against
2.2× when rebuilt and 4.3× for ``torch.func`` jvp-of-grad); chunks beyond the
budget rebuild their graph at every product, so memory does not grow with N.

Costs that do not scale with the model are paid once: in-memory data are
moved to the model's device (and dtype) at construction, a matvec whose chunks
are all cached does not read the data at all, and a block ``(D, b)`` builds
each uncached chunk's graph once for its ``b`` columns. BatchNorm layers in
eval mode are per-channel affine maps; autograd's generic BatchNorm
double-backward formula costs more than the rest of a small CNN's product, so
while graphs are built they are folded into the convolution (or linear layer)
that feeds them — the same function of the same parameters (measured on
``SmallCNN``: 2.7× a gradient with the generic formula, 1.4× as an affine
map, about 1.2× folded).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from numbers import Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import (
    BatchSampler,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ._data import (
    DEFAULT_BATCH_SIZE,
    LabelledData,
    as_data,
    check_label_range,
    move_inputs,
)
from ._model import (
    FunctionalModel,
    OutputToLogits,
    check_finite_parameters,
    missing_derivative_error,
    once_differentiable_error,
    once_differentiable_function,
)
from .parameters import ParameterSpace, ParamSelection, unwrap_model

_CURVATURES = ("hessian", "ggn")
_PRODUCTS = ("autograd", "finite_difference")


def default_cache_bytes(device: torch.device) -> int:
    """A quarter of the free memory on ``device``; on the host at most 4 GiB
    (host memory is shared with everything else on the machine)."""
    cap = 4 << 30
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free // 4)
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(cap, pages // 4))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 1 << 30


def _saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and measure the bytes autograd saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
            "eps")


class _FoldEvalBatchNorm(TorchFunctionMode):
    """Evaluate eval-mode BatchNorm as the per-channel affine map it is, and
    fold it into the convolution or linear layer that feeds it.

    ``BN(conv(x, W) + b) = conv(x, W·s) + (b·s + t)`` with ``s = γ/√(var+ε)``,
    ``t = β − μ·s``: the same function of the same parameters, whose first and
    second backward passes touch only the small weight tensors instead of
    every activation (autograd's generic BatchNorm double-backward formula
    makes several passes over them). A BatchNorm whose input is not the
    untouched output of a convolution/linear call is applied as ``x·s + t``.
    The folded layer is evaluated once more (the first output stays valid
    for any other use), which costs one convolution in the forward pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self._producers: dict[int, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS or func is F.linear:
            out = func(*args, **kwargs)
            call = dict(zip(_CONV_ARGS if func in _CONVS else ("input", "weight", "bias"), args))
            call.update(kwargs)
            if isinstance(out, torch.Tensor) and (func in _CONVS or out.ndim == 2):
                tensors = [t for t in (call.get("input"), call.get("weight"), call.get("bias"))
                           if isinstance(t, torch.Tensor)]
                self._producers[id(out)] = (weakref.ref(out), out._version, func, call,
                                            [(t, t._version) for t in tensors])
            return out
        if func is F.batch_norm:
            a = dict(zip(_BN_ARGS, args))
            a.update(kwargs)
            mean, var = a.get("running_mean"), a.get("running_var")
            if not a.get("training", False) and mean is not None and var is not None:
                return self._eval_batch_norm(a["input"], mean, var, a.get("weight"),
                                             a.get("bias"), a.get("eps", 1e-5))
        return func(*args, **kwargs)

    def _eval_batch_norm(self, x, mean, var, weight, bias, eps):
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = weight * scale
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        producer = self._producers.get(id(x))
        if producer is not None:
            ref, version, func, call, inputs = producer
            # Fold only into the untouched output of that very call (no in-place
            # change since, to it or to what it was computed from).
            if (ref() is x and x._version == version
                    and all(t._version == v for t, v in inputs)):
                call = dict(call)
                w = call["weight"]
                call["weight"] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
                b = call.get("bias")
                call["bias"] = shift if b is None else b * scale + shift
                return func(**call)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _is_shuffled(data: LabelledData) -> bool:
    """Whether two passes over ``data`` may give its chunks in a different order
    (a random sampler, or a batch sampler of unknown kind)."""
    loader = data.loader
    if loader is None:
        return False
    random_kinds = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        return True
    samplers = (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
    return any(isinstance(s, random_kinds) for s in samplers)


class HessianOperator:
    """Hessian (or GGN) of the mean cross-entropy of a classifier, as a linear operator.

    Parameters
    ----------
    model : nn.Module or skorch net
        The trained classifier; evaluated in eval mode. Its parameters,
        buffers and train/eval flags are left exactly as they were.
    X, y : tensor, ndarray, mapping, Dataset or DataLoader
        The data the loss is averaged over. ``X`` may be a mapping of named
        input tensors (a dict, a tokenizer's ``BatchEncoding``): the model is
        called as ``model(**X)``, every tensor chunked along its first
        dimension. With a Dataset/DataLoader, ``y`` is None and batches are
        ``(inputs, labels)`` or mappings with a ``"labels"`` entry.
    params : None, str, sequence of str or callable
        Which parameters span the operator (see :class:`ParameterSpace`).
    curvature : {"hessian", "ggn"}, default="hessian"
        The exact Hessian, or the generalised Gauss–Newton matrix
        ``Σ_i J_iᵀ H_out,i J_i / N`` (positive semi-definite).
    batch_size : int, default=512
        Chunk size for tensor/array data (a DataLoader keeps its own). Larger
        chunks keep more cores busy and cost more memory per uncached chunk;
        results do not depend on it.
    output_to_logits : callable, optional
        Maps the model's forward output to logits (default: tensor, first
        element of a tuple, ``"logits"`` of a dict, ``.logits``).
    process_group : torch.distributed ProcessGroup, optional
        Each rank passes its own shard of the data; products are summed over
        ranks and divided by the total sample count, so ``matvec`` equals the
        full-data operator on every rank.
    cache_bytes : int, optional
        Memory for first-order graphs kept across products, measured as the
        bytes autograd saves for them (default: a quarter of the free memory
        on the model's device, on the host at most 4 GiB; 0 disables the
        cache). Chunks are kept in order while they fit; the others are
        rebuilt at every product (about 2× the cost of a kept one), so memory
        stays within the budget however large the data. With a shuffling
        DataLoader the graphs are kept only if all of them fit.
    theta : tensor, optional
        Evaluate the curvature at these flat parameters instead of the model's.
    product : {"autograd", "finite_difference"}, default="autograd"
        ``"autograd"``: exact products by double backward, graphs kept as
        above. ``"finite_difference"``: first derivatives only, for a model
        with a layer that has no second derivative: the Hessian product is
        ``(∇L(θ+εv) − ∇L(θ−εv)) / 2ε`` and the GGN's ``J v`` is
        ``(f(θ+εv) − f(θ−εv)) / 2ε``, followed by one exact reverse pass.
        Every product makes two passes over the data and keeps no graph;
        its error is O(ε²) plus rounding (measured in docs/performance.md,
        "Attention models").
    fd_step : float, optional
        The length of the finite-difference step ``‖εv‖`` relative to the
        parameters' scale: ``ε = fd_step · max(1, rms(θ)) / ‖v‖``. Default:
        the cube root of the dtype's machine epsilon (about 5e-3 in float32,
        6e-6 in float64), which balances truncation and rounding error of
        central differences.

    Attributes
    ----------
    shape : (int, int)
    n_matvec : int
        Products computed so far.
    n_samples : int
        Total samples (over all ranks).
    n_outputs : int
        Number of classes the model predicts.
    cache_used : int
        Bytes of kept graphs (at most ``cache_bytes``).
    n_cached_chunks : int
        Chunks whose graphs are kept.

    Notes
    -----
    With ``process_group``, every rank must construct the operator and call
    every method that reduces (``matvec``, ``gradient``, ``loss``) the same
    number of times, as with any collective; each rank needs at least one
    sample. NCCL needs the model (hence the vectors) on the rank's GPU.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from hessrebal.curvature import HessianOperator
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> X, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
    >>> op = HessianOperator(model, X, y, batch_size=32)
    >>> op.shape, op.matvec(torch.ones(op.shape[0])).shape
    ((67, 67), torch.Size([67]))
    """

    def __init__(
        self,
        model: Any,
        X: Any,
        y: Any = None,
        params: ParamSelection = None,
        curvature: str = "hessian",
        batch_size: int | None = None,
        output_to_logits: OutputToLogits | None = None,
        process_group: Any = None,
        cache_bytes: int | None = None,
        theta: torch.Tensor | None = None,
        product: str = "autograd",
        fd_step: float | None = None,
    ) -> None:
        if curvature not in _CURVATURES:
            raise ValueError(f"curvature must be one of {_CURVATURES}; got {curvature!r}.")
        if product not in _PRODUCTS:
            raise ValueError(f"product must be one of {_PRODUCTS}; got {product!r}.")
        if fd_step is not None and (isinstance(fd_step, bool) or not isinstance(fd_step, Real)
                                    or not math.isfinite(fd_step) or fd_step <= 0):
            raise ValueError(f"fd_step must be a positive number or None; got {fd_step!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        module = unwrap_model(model)
        check_finite_parameters(module)
        self.space = ParameterSpace(module, params)
        self.fmodel = FunctionalModel(module, self.space, output_to_logits)
        self.curvature = curvature
        self.product = product
        self.fd_step = fd_step
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.process_group = process_group
        self.theta = (self.fmodel.initial_theta() if theta is None
                      else theta.detach().to(self.space.device, self.dtype).clone())
        if cache_bytes is not None and (isinstance(cache_bytes, bool) or int(cache_bytes) < 0):
            raise ValueError(f"cache_bytes must be a non-negative int; got {cache_bytes!r}.")
        self.cache_bytes = (default_cache_bytes(self.space.device)
                            if cache_bytes is None else int(cache_bytes))
        self.data: LabelledData = self._on_device(as_data(X, y))
        self.n_matvec = 0
        self._graph_checked = False
        self._affine_bn = _has_batchnorm(module)
        self._shuffled = _is_shuffled(self.data)
        self.clear_cache()
        self._validate_data()
        n_local = torch.tensor(self.data.n_samples, dtype=torch.int64, device=self.device)
        self.n_samples = int(self._all_reduce(n_local).item())
        if self.n_samples == 0:
            raise ValueError("X is empty (0 samples).")

    # -- the LinearOperator protocol --------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.space.dim, self.space.dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of vectors and products: float32 for a float16/bfloat16
        model (see :class:`~hessrebal._model.FunctionalModel`), else the
        parameters' dtype."""
        return self.space.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.space.device

    @property
    def cache_used(self) -> int:
        return self._cache_used

    @property
    def n_cached_chunks(self) -> int:
        return sum(fn is not None for fn in self._cache)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for ``v`` of shape ``(D,)``, or ``H @ V`` for a block ``(D, b)``
        (one pass over the data; counts ``b`` products)."""
        v = self._check_vector(v)
        try:
            out = self._sum_products(v)
        except RuntimeError as exc:
            # A layer without second derivatives (a fused kernel, a custom
            # once-differentiable function): say which, not autograd's words.
            x0 = next(iter(self._chunks()))[0]
            error = missing_derivative_error(self.fmodel, self.theta, x0, exc,
                                             f"{self.curvature} products")
            if error is None:
                raise
            raise error from exc
        out = self._all_reduce(out)
        out.div_(self.n_samples)
        self.n_matvec += 1 if v.ndim == 1 else int(v.shape[1])
        return out

    def _sum_products(self, v: torch.Tensor) -> torch.Tensor:
        """Σ over this rank's chunks of the chunk products with ``v``."""
        if self.product == "finite_difference":
            if v.ndim == 1:
                return self._finite_difference(v)
            return torch.stack([self._finite_difference(c) for c in v.T], dim=1)
        out = torch.zeros_like(v)
        if self._complete:
            # Every chunk's graph is kept: no pass over the data at all.
            for product in self._cache:
                out.add_(product(v))
        else:
            n_chunks = 0
            for i, (x, y) in enumerate(self._chunks()):
                out.add_(self._product_fn(i, x, y)(v))
                n_chunks = i + 1
            self._complete = (n_chunks == len(self._cache)
                              and all(fn is not None for fn in self._cache))
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` over float64 numpy vectors."""
        from scipy.sparse.linalg import LinearOperator

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().cpu().numpy().astype(np.float64)

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    # -- first-order quantities (same chunking, for comparisons) ----------
    def loss(self) -> float:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for x, y in self._chunks():
                total += F.cross_entropy(self.fmodel.logits(self.theta, x), y, reduction="sum")
        return float(self._all_reduce(total) / self.n_samples)

    def gradient(self) -> torch.Tensor:
        """∇L(θ), the mean cross-entropy's gradient, chunk by chunk."""
        out = torch.zeros(self.space.dim, dtype=self.dtype, device=self.device)
        for x, y in self._chunks():
            theta = self.theta.detach().requires_grad_(True)
            loss = F.cross_entropy(self.fmodel.logits(theta, x), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, theta)
            out.add_(g)
        return self._all_reduce(out).div_(self.n_samples)

    def clear_cache(self) -> None:
        """Free the kept first-order graphs."""
        self._cache: list[Callable[[torch.Tensor], torch.Tensor] | None] = []
        self._cache_used = 0
        self._cache_full = self.cache_bytes <= 0
        self._complete = False

    # -- internals ---------------------------------------------------------
    def _chunks(self):
        return self.data.chunks(self.batch_size, self.device, self.dtype)

    def _on_device(self, data: LabelledData) -> LabelledData:
        """In-memory data moved to the model's device and dtype once, not per
        product, when the copy takes at most a quarter of the free memory."""
        if not data.in_memory:
            return data
        X, y = data.X, data.y
        tensors = list(X.values()) if isinstance(X, dict) else [X]

        def dtype_of(t: torch.Tensor) -> torch.dtype:
            return self.dtype if t.is_floating_point() else t.dtype

        if (all(t.device == self.device and t.dtype == dtype_of(t) for t in tensors)
                and y.device == self.device):
            return data
        nbytes = sum(t.numel() * torch.empty((), dtype=dtype_of(t)).element_size()
                     for t in tensors) + y.numel() * 8
        if nbytes > default_cache_bytes(self.device):
            return data
        return LabelledData(move_inputs(X, self.device, self.dtype), y.to(self.device),
                            name=data.name, y_name=data.y_name)

    def _forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._affine_bn:
            with _FoldEvalBatchNorm():
                return self.fmodel.logits(theta, x)
        return self.fmodel.logits(theta, x)

    def _validate_data(self) -> None:
        first = next(iter(self._chunks()), None)
        if first is None:
            raise ValueError("X is empty (0 samples).")
        self.n_outputs = self.fmodel.probe(first[0])
        if self.data.in_memory:
            check_label_range(self.data.y, self.n_outputs)
        else:
            check_label_range(first[1], self.n_outputs)

    def _check_vector(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor; got {type(v).__name__}.")
        if v.shape[0] != self.space.dim or v.ndim not in (1, 2):
            raise ValueError(f"v must have shape ({self.space.dim},) or ({self.space.dim}, b); "
                             f"got {tuple(v.shape)}.")
        if v.dtype != self.dtype or v.device != self.device:
            v = v.to(device=self.device, dtype=self.dtype)
        return v

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.process_group is None:
            return t
        from ._distributed import all_reduce

        # Watched for failure notices of other ranks inside a fit (see
        # hessrebal._distributed); a plain blocking all-reduce otherwise.
        return all_reduce(t, self.process_group)

    def _product_fn(self, i: int, x: torch.Tensor, y: torch.Tensor):
        """The chunk's product ``v ↦ Σ_chunk ∇²ℓ · v``, from the cache when kept."""
        if i < len(self._cache) and self._cache[i] is not None:
            return self._cache[i]
        if not self.data.in_memory:
            check_label_range(y, self.n_outputs)
        build = self._build_hessian if self.curvature == "hessian" else self._build_ggn
        # Chunks are kept in order (chunk i only if chunks 0..i-1 are), so a
        # partly cached sweep is always a prefix of the data.
        can_cache = not self._cache_full and len(self._cache) == i
        if not can_cache:
            return _single_use(build(x, y, keep=False))
        fn, nbytes = _saved_bytes(lambda: build(x, y, keep=True))
        if self._cache_used + nbytes <= self.cache_bytes:
            self._cache_used += nbytes
            self._cache.append(_columns(fn))
            return self._cache[-1]
        # Over budget: stop caching. A shuffling loader would pair a kept
        # prefix with different samples next time, so it keeps nothing.
        self._cache_full = True
        if self._shuffled and self._cache:
            self._cache = []
            self._cache_used = 0
        return _single_use(fn)

    def _finite_difference(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's sum of chunk products with ``v`` by central differences
        of first derivatives (see ``product``)."""
        out = torch.zeros_like(v)
        norm_v = float(v.norm())
        if norm_v == 0:
            return out
        h = self.fd_step if self.fd_step is not None else torch.finfo(self.dtype).eps ** (1 / 3)
        rms_theta = float(self.theta.norm()) / math.sqrt(self.theta.numel())
        eps = h * max(1.0, rms_theta) / norm_v
        plus, minus = self.theta + eps * v, self.theta - eps * v
        for x, y in self._chunks():
            if self.curvature == "hessian":
                out.add_(self._chunk_gradient(plus, x, y) - self._chunk_gradient(minus, x, y))
                continue
            with torch.no_grad():
                jv = self._forward(plus, x) - self._forward(minus, x)
            theta = self.theta.detach().requires_grad_(True)
            z = self._forward(theta, x)
            p = torch.softmax(z.detach(), dim=1)
            w = p * jv - p * (p * jv).sum(dim=1, keepdim=True)
            (jtw,) = torch.autograd.grad(z, theta, w)
            out.add_(jtw)
        return out.div_(2 * eps)

    def _chunk_gradient(self, theta: torch.Tensor, x, y) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(self._forward(theta, x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, theta)
        return g

    def _check_graph(self, z: torch.Tensor, x) -> None:
        """Refuse, once, a graph whose second derivatives autograd gets wrong
        without an error (a custom function with a once-differentiable backward)."""
        if self._graph_checked:
            return
        function = once_differentiable_function(z)
        if function is not None:
            raise once_differentiable_error(self.fmodel, self.theta, x, function,
                                            f"{self.curvature} products")
        self._graph_checked = True

    def _build_hessian(self, x, y, keep: bool):
        theta = self.theta.detach().requires_grad_(True)
        z = self._forward(theta, x)
        self._check_graph(z, x)
        loss = F.cross_entropy(z, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)

        def product(v: torch.Tensor, retain: bool = keep) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, theta, v, retain_graph=retain)
            return hv

        return product

    def _build_ggn(self, x, y, keep: bool):
        theta = self.theta.detach().requires_grad_(True)
        z = self._forward(theta, x)
        self._check_graph(z, x)
        p = torch.softmax(z.detach(), dim=1)
        # J v by the double-vjp trick: g(u) = Jᵀu is linear in u, so d/du (g·v) = J v.
        u = torch.zeros_like(z, requires_grad=True)
        (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)

        def product(v: torch.Tensor, retain: bool = keep) -> torch.Tensor:
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            # Hessian of softmax cross-entropy w.r.t. the logits: diag(p) − p pᵀ.
            w = p * jv - p * (p * jv).sum(dim=1, keepdim=True)
            (jtw,) = torch.autograd.grad(z, theta, w, retain_graph=retain)
            return jtw

        return product


def _columns(product):
    """A chunk product applied to ``(D,)`` or, column by column, to ``(D, b)``."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 1:
            return product(v)
        b = v.shape[1]
        return torch.stack([product(v[:, j], retain=True) for j in range(b)], dim=1)

    return apply


def _single_use(product):
    """An uncached chunk product: the graph is freed after the last column."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 1:
            return product(v, retain=False)
        b = v.shape[1]
        return torch.stack([product(v[:, j], retain=j < b - 1) for j in range(b)], dim=1)

    return apply
