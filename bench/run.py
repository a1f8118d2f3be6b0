"""Run every benchmark module ``bench/bench_*.py`` in turn: ``python -m bench.run [flags]``.

The flags (``--shapes``, ``--repeats``, ``--device``, ... see :mod:`bench.harness`) are parsed
once and handed to each module's ``run(args)``; ``--only NAME[,NAME]`` picks modules (e.g. ``--only lif``).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

from bench import harness


def modules() -> list[str]:
    here = str(Path(__file__).resolve().parent)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--only", default="", help="comma-separated module names without 'bench_'")
    args = parser.parse_args(argv)
    names = modules()
    if args.only:
        wanted = {"bench_" + n.strip().removeprefix("bench_") for n in args.only.split(",")}
        if wanted - set(names):
            parser.error(f"no such bench module(s) {sorted(wanted - set(names))}; have {names}")
        names = [n for n in names if n in wanted]
    for name in names:
        print(f"# bench.{name}")
        importlib.import_module(f"bench.{name}").run(args)


if __name__ == "__main__":
    main()
