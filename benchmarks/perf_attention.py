"""What attention costs hessrebal: the math kernels its differentiated passes use
against PyTorch's fused kernels, and its products against a gradient.

hessrebal evaluates attention, in every pass it differentiates, through the
math backend of ``F.scaled_dot_product_attention`` and the explicit-weights
branch of ``nn.MultiheadAttention`` (the fused kernels have no double
backward; see ``hessrebal._model.DifferentiableAttention``). Per model, over
the same data and chunks, this times

- a forward pass (no grad) with the fused kernel (the model as the user runs
  it) and with the math kernel (``forward_math_over_fused``);
- a gradient (``loss.backward()``) with each (``gradient_math_over_fused``);
- the operator's Hessian-vector product, graphs kept (``hvp_cached``) and
  rebuilt (``hvp_uncached``), and the finite-difference product
  (``hvp_finite_difference``), each over the fused-kernel gradient;

and measures the finite-difference product's relative error against the
exact product (float64 reference) on random unit vectors, for a float32 and a
float64 model. Models: a ViT (torchvision ``VisionTransformer``, 32×32
images, patch 4: 65 tokens, width 64, 2 layers) and a token classifier with
``nn.MultiheadAttention`` (128 tokens, width 64, padding mask).

    python benchmarks/perf_attention.py [--threads 1] [--rounds 5] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torchvision
from _perf import emit, interleaved, ratio, setup
from torch import nn

from hessrebal._model import DifferentiableAttention
from hessrebal.curvature import HessianOperator

N, BATCH, C = 256, 64, 10


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def models():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=C).eval()
    yield "vit", vit, torch.randn(N, 3, 32, 32, generator=g)
    tok = TokenClassifier().eval()
    mask = torch.ones(N, 128, dtype=torch.long)
    mask[:, 100:] = 0
    yield "multihead_attention", tok, {
        "input_ids": torch.randint(0, 100, (N, 128), generator=g), "attention_mask": mask}


def chunks(X, y):
    for s in range(0, N, BATCH):
        x = ({k: t[s:s + BATCH] for k, t in X.items()} if isinstance(X, dict)
             else X[s:s + BATCH])
        yield x, y[s:s + BATCH]


def call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def forward(model, X, y, math: bool) -> None:
    with torch.no_grad():
        for x, _ in chunks(X, y):
            if math:
                with DifferentiableAttention():
                    call(model, x)
            else:
                call(model, x)


def gradient(model, X, y, math: bool) -> None:
    model.zero_grad(set_to_none=True)
    for x, t in chunks(X, y):
        if math:
            with DifferentiableAttention():
                loss = F.cross_entropy(call(model, x), t, reduction="sum")
        else:
            loss = F.cross_entropy(call(model, x), t, reduction="sum")
        loss.backward()


def fd_error(model, X, y, n_vectors: int = 4) -> dict[str, float]:
    """Relative error of the default finite-difference product against the
    exact float64 product, float32 and float64 models (worst of n vectors)."""
    m64 = copy.deepcopy(model).double()
    X64 = ({k: (t.double() if t.is_floating_point() else t) for k, t in X.items()}
           if isinstance(X, dict) else X.double())
    exact = HessianOperator(m64, X64, y, batch_size=BATCH)
    out = {}
    g = torch.Generator().manual_seed(1)
    V = torch.randn(exact.shape[0], n_vectors, generator=g, dtype=torch.float64)
    V /= V.norm(dim=0)
    ref = exact.matvec(V)
    for name, m, Xm in (("float32", model, X), ("float64", m64, X64)):
        op = HessianOperator(m, Xm, y, batch_size=BATCH, product="finite_difference")
        approx = op.matvec(V.to(op.dtype)).double()
        out[name] = float(((approx - ref).norm(dim=0) / ref.norm(dim=0)).max())
    return out


def measure(name, model, X, rounds: int) -> dict:
    y = torch.arange(N) % C
    cached = HessianOperator(model, X, y, batch_size=BATCH)
    uncached = HessianOperator(model, X, y, batch_size=BATCH, cache_bytes=0)
    fd = HessianOperator(model, X, y, batch_size=BATCH, product="finite_difference")
    v = torch.randn(cached.shape[0], generator=torch.Generator().manual_seed(0))
    cached.matvec(v)  # builds the kept graphs
    times = interleaved({
        "forward_fused": lambda: forward(model, X, y, False),
        "forward_math": lambda: forward(model, X, y, True),
        "gradient_fused": lambda: gradient(model, X, y, False),
        "gradient_math": lambda: gradient(model, X, y, True),
        "hvp_cached": lambda: cached.matvec(v),
        "hvp_uncached": lambda: uncached.matvec(v),
        "hvp_finite_difference": lambda: fd.matvec(v),
    }, rounds)
    return {
        "model": name, "n_parameters": cached.shape[0], "n_samples": N, "batch_size": BATCH,
        "seconds_best": {k: min(t) for k, t in times.items()},
        "forward_math_over_fused": ratio(times, "forward_math", "forward_fused"),
        "gradient_math_over_fused": ratio(times, "gradient_math", "gradient_fused"),
        "hvp_cached_over_gradient_fused": ratio(times, "hvp_cached", "gradient_fused"),
        "hvp_uncached_over_gradient_fused": ratio(times, "hvp_uncached", "gradient_fused"),
        "hvp_finite_difference_over_gradient_fused": ratio(times, "hvp_finite_difference",
                                                           "gradient_fused"),
        "finite_difference_relative_error": fd_error(model, X, y),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    machine = setup(args.threads)
    results = [measure(name, model, X, args.rounds) for name, model, X in models()]
    emit({"machine": machine, "results": results}, args.output)


if __name__ == "__main__":
    main()
