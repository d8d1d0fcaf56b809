"""docs/BENCHMARKS.md: each benchmark rewrites its own block, between its markers
inside its section, and leaves the rest of the file (notes included) as it is."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"


def write_section(section: str, name: str, report: str, path: Path = DOC) -> None:
    """Put `report` between <!-- name:begin --> and <!-- name:end --> under `section`
    (heading and markers added when missing), then rename the file into place."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{report}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif section in text:
        at = text.index(section) + len(section)
        text = f"{text[:at]}\n\n{block}\n{text[at:]}"
    else:
        text = f"{text.rstrip()}\n\n{section}\n\n{block}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(section: str, name: str, report: str, write: bool) -> None:
    """Print the report and, unless told not to, put it in its section of docs/BENCHMARKS.md."""
    print()
    print(report)
    if write:
        write_section(section, name, report)
        print(f"\nwrote {DOC.relative_to(ROOT)}")
