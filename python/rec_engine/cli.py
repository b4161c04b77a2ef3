"""The ``rec-engine`` command line."""
from __future__ import annotations

import argparse
import sys

from ._core import RecEngineError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rec-engine", description="rec_engine command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the kernels on generated data and print results and timings")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=20000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--k", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print the SIMD level and threads in use")
    try:
        from rec_engine_train.cli import add_commands
    except ImportError as e:          # the train extra is not installed
        missing = str(e)
        for name in ("train", "evaluate"):
            p = sub.add_parser(name, help=f"(needs the train extra: pip install 'rec_engine[train]')")
            p.set_defaults(handler=lambda _a, m=missing: parser.error(f"training needs the train extra ({m})"))
    else:
        add_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "handler"):
        try:
            return args.handler(args)
        except (ValueError, TypeError, IndexError, OSError, RecEngineError) as e:   # user errors: no traceback
            print(f"rec-engine {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from .demo import run
        run(n_users=args.users, n_items=args.items, dim=args.dim, k=args.k, seed=args.seed)
    elif args.command == "info":
        from . import runtime
        print(f"simd_level={runtime.simd_level()} supported={','.join(runtime.supported_simd_levels())} "
              f"openmp={runtime.openmp_enabled()} threads={runtime.default_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
