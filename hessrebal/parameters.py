"""ParameterSpace: which parameters the surgery moves, and the one place that
flattens, unflattens and applies flat vectors to them.

The flat order is ``model.named_parameters()`` restricted to the selection;
``eigenvectors_`` rows and ``parameter_names_`` follow it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

ParamSelection = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]

#: Parameter dtypes that hessrebal does its arithmetic on in float32: their
#: 8-bit (bfloat16) or 11-bit (float16) mantissas cannot resolve the small
#: Hessian-vector products and step sizes, and NumPy has no bfloat16.
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype hessrebal computes in for parameters stored as ``dtype``:
    float32 for :data:`LOW_PRECISION_DTYPES`, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION_DTYPES else dtype


def unwrap_model(model: Any, name: str = "model") -> nn.Module:
    """The ``nn.Module`` behind ``model`` (itself, or a skorch net's ``module_``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module_", None)
    if isinstance(inner, nn.Module):
        return inner
    if hasattr(model, "module") and not hasattr(model, "module_"):
        raise TypeError(
            f"{name} looks like an uninitialised skorch net; call its initialize() or fit() first."
        )
    raise TypeError(
        f"{name} must be a torch.nn.Module or a fitted skorch net; got {type(model).__name__}."
    )


class ParameterSpace:
    """The selected parameters of a model as one flat vector.

    Parameters
    ----------
    model : nn.Module or skorch net
        The model whose parameters are selected.
    params : None, str, sequence of str, or callable, default=None
        ``None`` selects every parameter with ``requires_grad``. A string or
        a sequence of strings selects parameters by exact name or by module
        prefix (``"fc"`` selects ``fc.weight`` and ``fc.bias``); every entry
        must match something. A callable ``(name, parameter) -> bool`` selects
        where it returns True.

    Attributes
    ----------
    names : list of str
        Selected parameter names, in ``named_parameters()`` order.
    shapes : list of torch.Size
    dim : int
        Total number of selected scalars ``D``.
    dtype, device
        Shared by all selected parameters (``dtype`` as stored in the model).
    compute_dtype : torch.dtype
        The dtype flat vectors (θ, directions, the perturbation) have:
        float32 for a float16 or bfloat16 selection, else ``dtype``.
    """

    def __init__(self, model: Any, params: ParamSelection = None) -> None:
        module = unwrap_model(model)
        named = list(module.named_parameters())
        selected = _select(named, params)
        if not selected:
            raise ValueError(
                "params selects no parameters"
                + (" (the model has no parameter with requires_grad=True)." if params is None
                   else ".")
            )
        dtypes = {p.dtype for _, p in selected}
        devices = {p.device for _, p in selected}
        if len(dtypes) > 1:
            raise TypeError(f"Selected parameters have mixed dtypes {sorted(map(str, dtypes))}.")
        if len(devices) > 1:
            raise ValueError(f"Selected parameters live on several devices: {devices}.")
        if not next(iter(dtypes)).is_floating_point:
            raise TypeError("Selected parameters must be floating point.")
        self.names: list[str] = [n for n, _ in selected]
        self.shapes: list[torch.Size] = [p.shape for _, p in selected]
        self.numels: list[int] = [p.numel() for _, p in selected]
        self.dim: int = sum(self.numels)
        self.dtype: torch.dtype = next(iter(dtypes))
        self.device: torch.device = next(iter(devices))
        self.compute_dtype: torch.dtype = compute_dtype(self.dtype)
        self._index = set(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ParameterSpace({len(self.names)} tensors, dim={self.dim}, dtype={self.dtype})"

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (a name mapping or a sequence in order) into one vector."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise KeyError(f"Missing selected parameter '{missing[0]}'.")
            seq = [tensors[n] for n in self.names]
        else:
            seq = list(tensors)
            if len(seq) != len(self.names):
                raise ValueError(f"Expected {len(self.names)} tensors, got {len(seq)}.")
        for name, shape, t in zip(self.names, self.shapes, seq):
            if t.shape != shape:
                raise ValueError(f"Tensor for '{name}' has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}.")
        return torch.cat([t.reshape(-1) for t in seq])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` (shape ``(D,)``) as a name → tensor dict."""
        if flat.ndim != 1 or flat.shape[0] != self.dim:
            raise ValueError(f"Expected a vector of length {self.dim}; got shape "
                             f"{tuple(flat.shape)}.")
        parts = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def gather(self, model: Any) -> torch.Tensor:
        """A detached flat copy of ``model``'s selected parameters, in
        :attr:`compute_dtype` (exact: float32 holds every float16/bfloat16 value)."""
        params = dict(unwrap_model(model).named_parameters())
        flat = self.flatten({n: params[n].detach() for n in self.names})
        return flat.to(self.compute_dtype, copy=True)

    def check_compatible(self, model: Any, name: str = "model") -> None:
        """Raise ValueError naming the first selected parameter that ``model``
        lacks or holds with another shape."""
        params = dict(unwrap_model(model, name).named_parameters())
        for pname, shape in zip(self.names, self.shapes):
            if pname not in params:
                raise ValueError(
                    f"{name} has no parameter '{pname}' (the fitted selection has it)."
                )
            if params[pname].shape != shape:
                raise ValueError(
                    f"{name}.{pname} has shape {tuple(params[pname].shape)}; the fitted "
                    f"selection has {tuple(shape)}."
                )

    def apply(self, model: Any, delta: torch.Tensor, copy: bool = True) -> Any:
        """Return ``model`` with ``delta`` added to the selected parameters.

        With ``copy=True`` (default) a deep copy is changed and returned and
        ``model`` is untouched; with ``copy=False`` ``model`` is changed in place.
        A skorch net is copied whole, so the result has the type that was given.
        Each parameter keeps its dtype. A float16/bfloat16 parameter gets
        ``θ₀ + delta`` summed in float32 and rounded once to its dtype, the
        value the surgeon evaluated; adding a rounded ``delta`` in place would
        round twice.
        """
        self.check_compatible(model)
        target = _deepcopy(model) if copy else model
        params = dict(unwrap_model(target).named_parameters())
        with torch.no_grad():
            for pname, d in self.unflatten(delta.detach()).items():
                p = params[pname]
                if p.dtype in LOW_PRECISION_DTYPES:
                    wide = compute_dtype(p.dtype)
                    p.copy_(p.to(wide) + d.to(device=p.device, dtype=wide))
                else:
                    p.add_(d.to(device=p.device, dtype=p.dtype))
        return target

    def metadata(self) -> dict[str, Any]:
        """Names and shapes, for persistence."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtype": str(self.dtype).replace("torch.", "")}


def _deepcopy(model: Any) -> Any:
    return copy.deepcopy(model)


def _select(named: list[tuple[str, nn.Parameter]], params: ParamSelection):
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    if callable(params) and not isinstance(params, str):
        return [(n, p) for n, p in named if params(n, p)]
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, Sequence) or not all(isinstance(s, str) for s in params):
        raise TypeError("params must be None, a name, a sequence of names or prefixes, "
                        f"or a callable; got {type(params).__name__}.")

    def matches(name: str, key: str) -> bool:
        return name == key or name.startswith(key + ".")

    for key in params:
        if not any(matches(n, key) for n, _ in named):
            available = ", ".join(n for n, _ in named[:8])
            raise ValueError(f"params: unknown parameter name or prefix '{key}' "
                             f"(the model has: {available}{', ...' if len(named) > 8 else ''}).")
    return [(n, p) for n, p in named if any(matches(n, k) for k in params)]
