"""docs/reliability.md names the tests behind its figures: they must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_cited_test_exists():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", doc)
    assert len(cited) >= 10
    for file, name in cited:
        source = (ROOT / "tests" / file).read_text()
        if name:
            assert re.search(rf"def {name}\b", source), f"{file}::{name} is gone"
