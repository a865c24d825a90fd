"""THREAT_MODEL.md names, for each defence, the test that shows it: every one of those tests must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "THREAT_MODEL.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", text))
    assert len(named) > 50
    missing = []
    for file, test in sorted(named):
        path = ROOT / "tests" / file
        source = path.read_text(encoding="utf-8") if path.is_file() else ""
        if not re.search(rf"^(?:async )?def {test}\(", source, re.MULTILINE):
            missing.append(f"{file}::{test}")
    assert missing == []
