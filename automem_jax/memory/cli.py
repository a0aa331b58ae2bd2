"""The memory-structure command line: show, diff, validate, import-upstream, check-upstream.

Run it as ``python -m automem_jax.memory.structure ...`` (documented) or
``python -m automem_jax.memory.cli ...``; see ``structure.py`` for examples.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from automem_jax.memory import upstream
from automem_jax.memory.diff import diff
from automem_jax.memory.structure import ENV_ALIASES, MemoryStructure, StructureError


def _resolve(arg: str) -> MemoryStructure:
    p = Path(arg)
    if p.is_file():
        return MemoryStructure.load(p)
    if ENV_ALIASES.get(arg, arg) in MemoryStructure.default_names():
        return MemoryStructure.default(arg)
    raise SystemExit(f"error: {arg!r} is neither a structure file nor a default "
                     f"({', '.join(MemoryStructure.default_names())})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m automem_jax.memory.structure",
                                 description="Show, diff, validate and import memory structures.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a structure (a default name or a file)")
    show.add_argument("structure")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    d = sub.add_parser("diff", help="list the changes from A to B")
    d.add_argument("a")
    d.add_argument("b")
    v = sub.add_parser("validate", help="check structures; exit status 1 if any is invalid")
    v.add_argument("structures", nargs="+")
    u = sub.add_parser("import-upstream",
                       help="build a structure from your own checkout of upstream AutoMem")
    u.add_argument("checkout", help="path to a local AutoMem checkout (holds scaffolds/)")
    u.add_argument("--scaffold", required=True, help="e.g. crafter_v5, minihack_v4, nethack_v2")
    u.add_argument("--env", choices=("crafter", "minihack", "nle", "nethack"), default=None,
                   help="which env's files and guidance to take (default: from the name)")
    u.add_argument("--out", required=True, help="structure file to write (.json or .yaml), "
                                                "outside this repository")
    c = sub.add_parser("check-upstream",
                       help="check that an imported structure's upstream files are unchanged")
    c.add_argument("structure")
    c.add_argument("--checkout", default=None, help="look here instead of the recorded path")
    args = ap.parse_args(argv)

    if args.cmd in ("import-upstream", "check-upstream"):
        if args.cmd == "import-upstream":
            return upstream.cli_import(args.checkout, args.scaffold, args.env, args.out)
        return upstream.cli_check(args.structure, args.checkout)

    if args.cmd == "show":
        s = _resolve(args.structure)
        sys.stdout.write(s.to_json() + "\n" if args.json else s.to_yaml())
        return 0
    if args.cmd == "diff":
        changes = diff(_resolve(args.a), _resolve(args.b))
        print("\n".join(changes) if changes else "(no changes)")
        return 0
    status = 0
    for arg in args.structures:
        try:
            _resolve(arg).validate()
            print(f"{arg}: ok")
        except StructureError as exc:
            status = 1
            print(f"{arg}: {exc}")
    return status


if __name__ == "__main__":
    sys.exit(main())
