"""The documentation holds together: every relative link in README.md, docs/, deploy/README.md and
bench/results/**/README.md points to a file that exists, and every ``#anchor`` into a Markdown file
names one of its headings (GitHub's slugs). The README stays a short front page whose commands are
the ones that run: ``scripts/quickstart.sh`` parses, and the test command is the one CI runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
QUICKSTART = REPO / "scripts" / "quickstart.sh"
MAX_README_LINES = 150

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def documents() -> list[Path]:
    docs = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]
    docs += sorted((REPO / "bench" / "results").glob("**/README.md"))
    return [d for d in docs if d.is_file()]


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered, lowercased, every character that is not a
    letter, digit, underscore, hyphen or space dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        result.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return result


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def test_slugs_follow_github() -> None:
    assert slug("Why DMM trailed DT — `python -m bench.dmm_vs_dt`") == (
        "why-dmm-trailed-dt--python--m-benchdmm_vs_dt"
    )
    assert slug("Several server processes (`--workers`)") == "several-server-processes---workers"
    assert slug("Scores at the paper's budget") == "scores-at-the-papers-budget"


def test_there_are_documents_and_links() -> None:
    names = {d.relative_to(REPO).as_posix() for d in documents()}
    assert {"README.md", "docs/results.md", "deploy/README.md"} <= names
    assert any(links(README))


@pytest.mark.parametrize("doc", documents(), ids=lambda d: d.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}"
    assert "bash scripts/quickstart.sh" in lines


def test_quickstart_script_parses_and_runs_what_the_readme_says() -> None:
    assert QUICKSTART.is_file()
    assert QUICKSTART.stat().st_mode & 0o111, "scripts/quickstart.sh is not executable"
    text = QUICKSTART.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    bash = shutil.which("bash")
    assert bash is not None
    check = subprocess.run([bash, "-n", str(QUICKSTART)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    commands = text.replace("\\\n", " ")
    for needle in (
        "python3 -m venv .venv",
        'pip install -e ".[all,dev]"',
        "dmm collect ",
        "--steps 100000",
        "dmm train ",
        "--updates 4000",
        "--config scripts/quickstart.yaml",
        "--mode window",
        "--mode recurrent",
    ):
        assert needle in commands, needle


def test_quickstart_config_loads_over_the_paper_settings() -> None:
    from dmm.trainer.config import load_train_config

    cfg = load_train_config("hopper-medium-sim-v4", REPO / "scripts" / "quickstart.yaml")
    assert (cfg.learning_rate, cfg.lr_schedule) == (1e-3, "cosine")
    assert cfg.model == load_train_config("hopper-medium-sim-v4").model


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = [line for line in README.read_text(encoding="utf-8").splitlines() if "python -m pytest" in line]
    assert readme == [". .venv/bin/activate && python -m pytest -q"]
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if "python -m pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci == ["python -m pytest -q"]
    assert readme[0].split(" && ")[-1] == ci[0]
