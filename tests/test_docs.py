"""
The README is a front page and docs/ holds the manual: these tests keep the two honest against the
tree. Pure file reads (and one `git ls-files`), no runs.
"""
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ENV_PAGE = REPO / "docs" / "environment.md"
LAYOUT_PAGE = REPO / "docs" / "layout.md"
MODULE_FOLDERS = ("arun", "engines", "arun_data")
# Where the code that reads or sets ARUN_* variables lives (the tests only use them).
CODE = [REPO / "arun", REPO / "engines", REPO / "arun_data", REPO / "benchmarks", REPO / "prepare.py",
        *sorted(REPO.glob("train_*.py"))]
ARUN_NAME = re.compile(r"\bARUN_[A-Z0-9_]*[A-Z0-9]")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAX_README_LINES = 150


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a Markdown page."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no '## {title}' section"
    return match.group(1)


def outside_code(text: str) -> str:
    """The page without its fenced code blocks (a shell line is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_code(page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def layout_names() -> list[str]:
    block = re.search(r"```\n(.*?)```", section(README.read_text(), "Layout"), re.S)
    assert block, "the Layout section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def code_files() -> list[Path]:
    files = []
    for place in CODE:
        files += sorted(p for p in place.rglob("*") if p.suffix in (".py", ".sh")) if place.is_dir() else [place]
    return files


def test_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"


def test_readme_test_command_is_what_ci_runs() -> None:
    # The README's one-line install-and-test, step by step, is what .ci/run runs in that order; CI may
    # run more between the steps (lint, types).
    line = next(x for x in README.read_text().splitlines() if x.startswith("python3 -m venv") and "pytest" in x)
    steps = [s.strip() for s in line.split(" && ")]
    ci = [s.split("#")[0].strip() for x in (REPO / ".ci" / "run").read_text().splitlines() for s in x.split(" && ")]
    at = 0
    for step in steps:
        assert step in ci[at:], f"README's test command step {step!r} is not run by .ci/run (in that order)"
        at = ci.index(step, at) + 1


def test_layout_names_what_exists_and_every_tracked_top_folder() -> None:
    names = layout_names()
    missing = [n for n in names if not (REPO / n).exists()]
    assert not missing, f"README Layout names what does not exist: {missing}"
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked folders are unknown")
    top = {path.split("/")[0] + "/" for path in tracked.splitlines() if "/" in path}
    named = {n.rstrip("/") + "/" for n in names}
    assert not top - named, f"README Layout does not name these tracked folders: {sorted(top - named)}"


def test_layout_page_names_every_module_and_only_modules_that_exist() -> None:
    named = set(re.findall(r"`([\w/]+\.py)`", LAYOUT_PAGE.read_text()))
    modules = {p.relative_to(REPO).as_posix() for folder in MODULE_FOLDERS for p in (REPO / folder).rglob("*.py")
               if p.name != "__init__.py"}
    assert not modules - named, f"docs/layout.md does not name {sorted(modules - named)}"
    gone = sorted(n for n in named if not (REPO / n).exists())
    assert not gone, f"docs/layout.md names modules that do not exist: {gone}"


def test_environment_page_lists_every_arun_variable_and_only_those() -> None:
    in_code = {name for f in code_files() for name in ARUN_NAME.findall(f.read_text(errors="replace"))}
    on_page = set(ARUN_NAME.findall(ENV_PAGE.read_text()))
    assert in_code, "no ARUN_* variable found in the code: the scan is broken"
    assert not in_code - on_page, f"docs/environment.md lacks {sorted(in_code - on_page)}"
    assert not on_page - in_code, f"docs/environment.md lists names the code never uses: {sorted(on_page - in_code)}"


def test_every_relative_link_resolves() -> None:
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(outside_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page() -> None:
    linked = set(LINK.findall(outside_code(README.read_text())))
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    orphans = {p for p in pages if not any(t.partition("#")[0] == p for t in linked)}
    assert not orphans, f"README.md does not link {sorted(orphans)}"
