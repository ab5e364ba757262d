"""The README's benchmark tables are generated from ``benchmarks/results/*.json``."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_their_results():
    report = _report()
    text = report.README.read_text()
    assert report.BLOCK.search(text), "the README has no generated table"
    rendered = report.render(text)
    differing = [m["module"] + "/" + m["name"]
                 for m, n in zip(report.BLOCK.finditer(text), report.BLOCK.finditer(rendered))
                 if m["body"] != n["body"]]
    assert not differing, (f"README tables {differing} differ from benchmarks/results; run "
                           "python benchmarks/report.py")


def test_a_changed_result_changes_the_table():
    report = _report()
    text = "intro\n<!-- table fake/main -->\n| stale |\n<!-- /table -->\nend\n"
    rendered = report.render(text, lambda module: {"main": f"| fresh {module} |"})
    assert rendered == "intro\n<!-- table fake/main -->\n| fresh fake |\n<!-- /table -->\nend\n"


def test_every_measured_table_is_generated():
    """No table of numbers in the Images and Benchmarks sections is typed by hand: every
    markdown table there lies inside a generated block."""
    report = _report()
    text = report.README.read_text()
    outside = report.BLOCK.sub("", text)
    sections = [part for part in outside.split("\n## ")
                if part.startswith(("Images", "Benchmarks"))]
    assert len(sections) == 2
    hand = [line for part in sections for line in part.splitlines()
            if line.startswith("| ---") or line.startswith("|---")]
    assert not hand, f"hand-typed tables in the README: {len(hand)}"
