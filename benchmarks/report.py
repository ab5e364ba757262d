"""Rewrite the README's benchmark tables from ``benchmarks/results/*.json``.

Each table sits between ``<!-- table MODULE/NAME -->`` and ``<!-- /table -->``; its content is
``benchmarks/MODULE.py``'s ``tables()[NAME]``. ``--check`` changes nothing and exits 1 when a
block differs from what its results give (the test suite runs this check).

    python benchmarks/report.py [--check]
"""
import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table (?P<module>[\w-]+)/(?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /table -->)", re.S)


def _module(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def render(text, tables_of=lambda module: _module(module).tables()):
    """``text`` (the README) with every table block regenerated; ``tables_of(module)`` gives a
    benchmark module's tables."""
    cache = {}

    def table(match):
        module = match["module"]
        if module not in cache:
            cache[module] = tables_of(module)
        tables = cache[module]
        if match["name"] not in tables:
            raise KeyError(f"benchmarks/{module}.py has no table {match['name']!r}; it has "
                           f"{sorted(tables)}")
        return match[1] + tables[match["name"]].rstrip("\n") + "\n" + match[5]

    return BLOCK.sub(table, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a README table differs from its results")
    args = parser.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README tables differ from benchmarks/results; run python "
                  "benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"rewrote {len(BLOCK.findall(text))} tables in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
