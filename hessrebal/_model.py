"""The user's model seen as a pure function of its selected parameters.

Every forward pass of hessrebal goes through :class:`FunctionalModel`: it runs
the module in eval mode (BatchNorm on running statistics, dropout off) with
``torch.func.functional_call``, so the user's parameters, buffers and
train/eval flags are never touched, whatever happens during the call.

Inputs are one tensor (``model(x)``) or a mapping of named tensors
(``model(**x)``). Attention is evaluated, in every pass that hessrebal
differentiates, through kernels that have the derivatives it takes (see
:class:`DifferentiableAttention`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ._data import Inputs, describe
from .parameters import LOW_PRECISION_DTYPES, ParameterSpace, compute_dtype, unwrap_model

OutputToLogits = Callable[[Any], torch.Tensor]


def default_output_to_logits(output: Any) -> torch.Tensor:
    """Logits from the usual forward outputs: a tensor, a tuple/list (first
    element), a dict with ``"logits"``, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return output["logits"]
        raise TypeError(
            f"The model returned a dict without 'logits' (keys: {sorted(output)}); "
            "pass output_to_logits= to say which entry holds the logits."
        )
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a model output of type {type(output).__name__}; "
        "pass output_to_logits=."
    )


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's flag as it was,
    even on an exception or KeyboardInterrupt."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def call_module(module: nn.Module, x: Inputs) -> Any:
    """``module(**x)`` for a mapping of named inputs, else ``module(x)``."""
    if isinstance(x, Mapping):
        return module(**x)
    return module(x)


def _math_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
        enable_gqa=enable_gqa)[0]


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class DifferentiableAttention(TorchFunctionMode):
    """Run attention through PyTorch's math kernels, which have every
    derivative hessrebal takes (double backward, forward mode, vmap).

    PyTorch's fused scaled-dot-product-attention kernels (flash, memory
    efficient, cuDNN, the CPU flash kernel) have first derivatives only, and
    ``nn.MultiheadAttention`` either calls them or, in eval mode without
    gradients, a fused fast path without forward-mode derivatives. Under
    this mode ``F.scaled_dot_product_attention`` is evaluated by the math
    backend (the same function, composed of matmul and softmax), and
    ``F.multi_head_attention_forward`` by its explicit-weights branch;
    being a torch-function mode, it also turns off the modules' fused fast
    paths. It is thread-local and changes no global setting, so the user's
    own calls elsewhere keep their kernels. :attr:`seen` records whether any
    attention ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen = True
            return _math_sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            self.seen = True
            call = _MHA_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = dict(call.arguments)
            # The explicit-weights branch computes softmax(QKᵀ/√d)V with plain
            # ops; without it the function hands over to a fused SDPA kernel
            # that this mode, being popped while it runs, would not see.
            wanted, a["need_weights"] = a["need_weights"], True
            out, weights = func(**a)
            return out, (weights if wanted else None)
        return func(*args, **kwargs)


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16/bfloat16 (a copy), else ``t`` itself."""
    return t.to(compute_dtype(t.dtype)) if t.dtype in LOW_PRECISION_DTYPES else t


class FunctionalModel:
    """``logits = f(theta, x)`` for the flat vector ``theta`` of selected parameters.

    Parameters outside the selection are used detached; buffers are private
    copies, so even a forward that writes to its buffers cannot change the
    user's model.

    A model stored in float16 or bfloat16 is run in float32 for everything
    that differentiates or perturbs (curvature, sensitivities): float32 copies
    of its low-precision parameters and buffers stand in for them, and
    ``theta`` is float32 (:attr:`dtype`). ``logits(..., native=True)`` runs
    it as the user will, in its own dtype at ``theta`` rounded to it; the
    accept/rollback evaluation and scores use that. The user's module is
    never cast.
    """

    def __init__(
        self,
        model: Any,
        space: ParameterSpace,
        output_to_logits: OutputToLogits | None = None,
    ) -> None:
        self.module = unwrap_model(model)
        self.space = space
        self.output_to_logits = output_to_logits or default_output_to_logits
        fixed = {
            name: p.detach() for name, p in self.module.named_parameters() if name not in space
        }
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        self._fixed = {name: _widened(t) for name, t in fixed.items()}
        self._buffers = {name: _widened(t) for name, t in buffers.items()}
        # The model as stored, for native evaluation; the same dicts when
        # nothing had to be widened (float32/float64 models).
        self.widened = space.compute_dtype != space.dtype or any(
            t.dtype in LOW_PRECISION_DTYPES for t in (*fixed.values(), *buffers.values()))
        self._native = (fixed, buffers) if self.widened else (self._fixed, self._buffers)
        # Whether the forward runs attention: None until the first
        # differentiable-mode pass has looked. Models without attention then
        # skip the (pass-through) mode, which costs Python dispatch per op.
        self.uses_attention: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.space.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``theta`` and of the inputs: float32 for a
        float16/bfloat16 model, else the parameters' dtype."""
        return self.space.compute_dtype

    @property
    def native_dtype(self) -> torch.dtype:
        """The selected parameters' dtype as stored in the model."""
        return self.space.dtype

    def initial_theta(self) -> torch.Tensor:
        """The model's current selected parameters, flattened (a copy)."""
        return self.space.gather(self.module)

    def logits(self, theta: torch.Tensor, x: Inputs, native: bool = False) -> torch.Tensor:
        """Logits at ``theta`` (in :attr:`dtype`); ``x`` is a tensor, or a
        mapping of named tensors passed as keyword arguments.

        Attention runs through differentiable math kernels
        (:class:`DifferentiableAttention`). ``native=True`` runs the model as
        the user will: a float16/bfloat16 model in its own dtype, at ``theta``
        rounded to it, and attention through the model's own kernels; the
        logits come back in :attr:`dtype`. Not differentiable in a useful way.
        """
        fixed, buffers = self._native if native else (self._fixed, self._buffers)
        if native and self.widened:
            theta = theta.to(self.native_dtype)
            x = _cast_floating(x, self.native_dtype)
        tensors = dict(fixed)
        tensors.update(self.space.unflatten(theta))
        tensors.update(buffers)
        args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), None)
        with evaluation_mode(self.module):
            if native or self.uses_attention is False:
                out = functional_call(self.module, tensors, args, kwargs)
            else:
                mode = DifferentiableAttention()
                with mode:
                    out = functional_call(self.module, tensors, args, kwargs)
                if self.uses_attention is None:
                    self.uses_attention = mode.seen
        logits = self.output_to_logits(out)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"The model's logits must have shape (n_samples, n_classes); got {shape}."
            )
        if native and self.widened and logits.is_floating_point():
            logits = logits.to(self.dtype)
        return logits

    def probe(self, x: Inputs, name: str = "X") -> int:
        """Run one chunk through the model and return its number of outputs,
        turning a shape error deep inside the model into one clear message."""
        try:
            with torch.no_grad():
                logits = self.logits(self.initial_theta(), x)
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            # A TypeError is the model's signature refusing the named inputs
            # (e.g. "unexpected keyword argument"); any other (an output
            # without logits) already says what to do.
            if isinstance(exc, TypeError) and not (isinstance(x, Mapping)
                                                   and "argument" in str(exc)):
                raise
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"The model cannot take {name} {describe(x)}: {first}") from exc
        if logits.shape[1] < 2:
            raise ValueError(
                f"The model has {logits.shape[1]} output; a classifier needs at least 2."
            )
        return int(logits.shape[1])


# Autograd's messages for a derivative PyTorch does not have: a missing
# backward of a backward (double backward), a missing forward-mode formula,
# and a custom autograd.Function marked once-differentiable.
_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (aten::\w+?)(?:_backward)?(?:\.\w+)? is not "
                                 r"implemented")
_NO_FORWARD_AD = re.compile(r"forward AD with (aten::\w+)(?:\.\w+)? that does not support it")
_ONCE_DIFFERENTIABLE = "marked with @once_differentiable"
_NO_SETUP_CONTEXT = "it must override the setup_context staticmethod"


def _function_class(grad_fn: Any) -> type | None:
    """The custom autograd.Function class behind a graph node, if it is one."""
    if isinstance(grad_fn, torch.autograd.function.BackwardCFunction):
        return getattr(grad_fn, "_forward_cls", None)
    return None


def _is_once_differentiable(cls: type | None) -> bool:
    # torch.autograd.function.once_differentiable wraps backward in a function
    # named "wrapper" defined in that module (functools.wraps copies the rest).
    code = getattr(getattr(cls, "backward", None), "__code__", None)
    return (code is not None and code.co_name == "wrapper"
            and code.co_filename.endswith(os.path.join("autograd", "function.py")))


def _lacks_setup_context(cls: type | None) -> bool:
    return cls is not None and cls.setup_context is torch.autograd.Function.setup_context


def once_differentiable_function(output: torch.Tensor) -> type | None:
    """A custom autograd.Function with a ``@once_differentiable`` backward in
    the graph of ``output``, if any. Autograd gives such a graph no error but
    wrong second derivatives (the backward runs without a graph), so the
    curvature products look for one before the first double backward."""
    seen: set[int] = set()
    todo = [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = _function_class(node)
        if _is_once_differentiable(cls):
            return cls
        todo.extend(n for n, _ in node.next_functions)
    return None


def once_differentiable_error(fmodel: FunctionalModel, theta: torch.Tensor, x: Inputs,
                              function: type, product: str) -> ValueError:
    """The error for a ``@once_differentiable`` custom function in the graph."""
    layer = _layer_running(fmodel, theta, x, None, _is_once_differentiable)
    where = f"layer '{layer[0]}' ({layer[1]})" if layer else "a layer"
    return ValueError(
        f"model: {where} uses the custom autograd.Function {function.__name__}, whose "
        "backward is marked @once_differentiable: autograd would silently drop its second "
        f"derivative, so hessrebal cannot take {product} through it. Give the function a "
        "differentiable backward, select only parameters that come after it with params= "
        "(e.g. the classifier head), or use HessianOperator(product='finite_difference'), "
        "which needs first derivatives only."
    )


def missing_derivative_error(fmodel: FunctionalModel, theta: torch.Tensor, x: Inputs,
                             exc: BaseException, product: str) -> ValueError | None:
    """A clear error for ``exc`` if it says that a layer of the model has no
    derivative of the order hessrebal needs, naming that layer; else None.

    ``product`` says which product failed (for the message). The layer is
    found by one more forward pass on ``x`` that records, per module, the
    aten operations it ran and the custom autograd functions it returned.
    """
    message = str(exc)
    if _NO_SETUP_CONTEXT in message:
        # torch.func transforms (the surrogate sensitivity's products) need
        # custom functions written for them.
        layer = _layer_running(fmodel, theta, x, None, _lacks_setup_context)
        where = f"layer '{layer[0]}' ({layer[1]})" if layer else "a layer"
        return ValueError(
            f"model: {where} uses a custom autograd.Function without setup_context, which "
            f"torch.func cannot transform, so hessrebal cannot take {product} through it. "
            "Give the function a setup_context (PyTorch's notes 'Extending torch.func with "
            "autograd.Function'), or use sensitivity=FiniteDifferenceSensitivity().")
    match = _NO_DOUBLE_BACKWARD.search(message) or _NO_FORWARD_AD.search(message)
    if match is None and _ONCE_DIFFERENTIABLE not in message:
        return None
    op = match.group(1) if match else None
    layer = _layer_running(fmodel, theta, x, op, _is_once_differentiable)
    what = (f"'{op}'" if op else "a custom autograd.Function marked @once_differentiable")
    where = (f"layer '{layer[0]}' ({layer[1]})" if layer else "a layer")
    order = ("forward-mode derivative" if match is not None and match.re is _NO_FORWARD_AD
             else "second derivative")
    return ValueError(
        f"model: {where} computes {what}, which has no {order} in PyTorch, so hessrebal "
        f"cannot take {product} through it. Write that layer with differentiable operations "
        "(for attention: F.scaled_dot_product_attention or nn.MultiheadAttention, which "
        "hessrebal evaluates with PyTorch's math kernels), select only parameters "
        "that come after it with params= (e.g. the classifier head), or, for the "
        "curvature alone, use HessianOperator(product='finite_difference'), which "
        "needs first derivatives only."
    )


def _layer_running(fmodel: FunctionalModel, theta: torch.Tensor, x: Inputs,
                   op: str | None,
                   function: Callable[[type | None], bool] = _is_once_differentiable,
                   ) -> tuple[str, str] | None:
    """The innermost module (name, class) whose forward ran aten ``op``, or,
    with ``op=None``, that returned the output of a custom autograd.Function
    whose class satisfies ``function``."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )
    from torch.utils._python_dispatch import TorchDispatchMode

    names = {id(m): (n or "<model>") for n, m in fmodel.module.named_modules()}
    stack: list[nn.Module] = []
    found: list[nn.Module] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if op is not None and stack and not found and func._schema.name == op:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def pre(module, args):
        stack.append(module)

    def post(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()
        if (op is None and not found and id(module) in names
                and function(_function_class(getattr(output, "grad_fn", None)))):
            found.append(module)

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        with torch.enable_grad(), Record():
            fmodel.logits(theta.detach().requires_grad_(True), x)
    except Exception:  # the diagnosis must never hide the original error
        return None
    finally:
        for h in handles:
            h.remove()
    if not found or id(found[0]) not in names:
        return None
    return names[id(found[0])], type(found[0]).__name__


def _cast_floating(x: Inputs, dtype: torch.dtype) -> Inputs:
    if isinstance(x, Mapping):
        return {k: _cast_floating(t, dtype) for k, t in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def check_finite_parameters(model: Any, name: str = "model") -> None:
    module = unwrap_model(model)
    for pname, p in module.named_parameters():
        if (p.is_floating_point() or p.is_complex()) and not torch.isfinite(p).all():
            raise ValueError(f"{name} has NaN or infinite values in parameter '{pname}'.")


def predict_logits(
    fmodel: FunctionalModel,
    theta: torch.Tensor,
    data,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of all of ``data`` at ``theta`` (CPU tensors).

    The model runs natively (a float16/bfloat16 model in its own dtype, at
    ``theta`` rounded to it): these logits decide accepted steps and scores,
    so they must be the ones the changed model will produce.
    """
    outs, ys = [], []
    with torch.no_grad():
        for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):
            outs.append(fmodel.logits(theta, x, native=True).cpu())
            ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def predictions_many(
    fmodel: FunctionalModel,
    thetas: torch.Tensor,
    data,
    batch_size: int,
    max_models_per_pass: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes ``(m, n)`` of ``m`` parameter vectors on all of ``data``.

    The ``m`` models run together through ``torch.func.vmap`` (one batched
    forward per chunk, not ``m``), in groups that keep ``group × batch``
    activations about the size of one ``batch_size`` chunk times 32.
    """
    from torch.func import vmap

    m = thetas.shape[0]
    group = max_models_per_pass or max(1, min(m, 32))
    preds, ys = [], []

    def one(theta, x):
        return fmodel.logits(theta, x).argmax(dim=1)

    with torch.no_grad():
        for x, y in data.chunks(batch_size, fmodel.device, fmodel.dtype):
            parts = []
            for start in range(0, m, group):
                block = thetas[start : start + group]
                try:
                    parts.append(vmap(one, in_dims=(0, None))(block, x))
                except (RuntimeError, NotImplementedError):
                    # Some modules (custom autograd functions, in-place ops on
                    # buffers) cannot be vmapped; fall back to a loop.
                    parts.append(torch.stack([one(t, x) for t in block]))
            preds.append(torch.cat(parts).cpu())
            ys.append(y.cpu())
    return torch.cat(preds, dim=1), torch.cat(ys)


def model_logits(model: Any, data, batch_size: int, name: str = "X") -> torch.Tensor:
    """All logits of an unchanged ``model`` on ``data`` (a ``LabelledData``) as a
    float64 CPU tensor: eval mode, chunked, the model's mode and buffers as they
    were afterwards. The one way the package runs a user's model as it is."""
    module = unwrap_model(model)
    params = list(module.parameters())
    if params and len({p.dtype for p in params}) == 1 and len({p.device for p in params}) == 1:
        # Every parameter, trainable or frozen: this space is only used to run
        # the model, never to move it.
        space = ParameterSpace(module, params=lambda n, p: True)
        fmodel = FunctionalModel(module, space)
        theta = fmodel.initial_theta()
        first = next(data.chunks(min(batch_size, 8), fmodel.device, fmodel.dtype), None)
        if first is None:
            raise ValueError(f"{name} is empty (0 samples).")
        fmodel.probe(first[0], name)
        logits, _ = predict_logits(fmodel, theta, data, batch_size)
    else:
        logits = _plain_logits(module, data, batch_size, name)
    if not torch.isfinite(logits).all():
        raise ValueError(f"The model returns NaN or infinite outputs on {name}.")
    return logits.to(torch.float64)


def _plain_logits(module: nn.Module, data, batch_size: int, name: str) -> torch.Tensor:
    """Forward passes for a model ParameterSpace cannot describe (no parameters,
    or mixed dtypes/devices): eval mode, no grad, buffers restored afterwards."""
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    device = next((b.device for b in buffers.values()), None)
    outs = []
    try:
        with torch.no_grad(), evaluation_mode(module):
            for x, _ in data.chunks(batch_size, device):
                try:
                    z = default_output_to_logits(call_module(module, x))
                except (RuntimeError, IndexError) as exc:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise ValueError(f"The model cannot take {name} "
                                     f"{describe(x)}: {first}") from exc
                if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] < 2:
                    raise ValueError("The model's outputs must have shape (n_samples, "
                                     "n_classes) with at least 2 classes.")
                outs.append(z.detach().cpu())
    finally:
        with torch.no_grad():
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
    if not outs:
        raise ValueError(f"{name} is empty (0 samples).")
    return torch.cat(outs)
