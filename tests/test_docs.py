from pathlib import Path

import pytest

from polytask.docs import TABLES

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("which", sorted(TABLES))
def test_generated_tables_are_up_to_date(which):
    path = DOCS / f"{which}.md"
    assert path.read_text() == TABLES[which](), (
        f"docs/{which}.md is out of date: run `python -m polytask.docs {which} > docs/{which}.md`"
    )
