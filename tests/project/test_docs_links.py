"""The repository's references point at things that exist: every relative markdown link (and its
#anchor) in a tracked .md file, every repository path a doc names outside its code blocks
(a folder such as docs/ or benchmarks/ followed by a file), and every upper-case *.md file
(README.md, CONTRACTS.md) that any doc or source file names.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("docs", "benchmarks", "deploy", "tests", "common", "coordinator", "silo", "cli", "scripts")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path into the repository: a top-level folder, then path characters, ending in a file name
# with an extension or a trailing slash.
REPO_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP) + r")/[\w./-]*[\w/])")
KUBECTL_REF = re.compile(r"\bdeploy/[\w-]+$")  # `kubectl ... deploy/NAME` is a Deployment
MD_NAME = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")
TEXT_SUFFIXES = {".md", ".py", ".toml", ".proto", ".yaml", ".yml", ".sh", ".cfg", ".txt"}


def tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / p for p in out.split() if Path(p).suffix in TEXT_SUFFIXES]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    heads = [m.group(1) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", md.read_text(), re.M)]
    return {slug(h) for h in heads}


def strip_code_blocks(text: str) -> str:
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code spans (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "", strip_code_blocks(text))


def broken_links(md: Path) -> list[str]:
    bad = []
    for target in LINK.findall(strip_code(md.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    return bad


def exists(ref: str, near: Path) -> bool:
    """A path, a path prefix (`benchmarks/results/causal_lm_`) or a module attribute
    (`common/data/synthetic.learned_rank`) of the repository."""
    if (ROOT / ref).exists() or (near / ref).exists():
        return True
    folder, _, stem = ref.rpartition("/")
    if (ROOT / folder).is_dir() and any(p.name.startswith(stem) for p in (ROOT / folder).iterdir()):
        return True
    return (ROOT / (ref.split(".")[0] + ".py")).exists()


def missing_paths(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    bad = []
    if path.suffix == ".md":
        for ref in set(REPO_PATH.findall(strip_code_blocks(text))):
            if ref.endswith("/X/") or KUBECTL_REF.fullmatch(ref) and "-" in ref:
                continue  # a placeholder folder, or a Kubernetes Deployment name
            if not exists(ref.rstrip("./"), path.parent):
                bad.append(ref)
    bad += [f"{n} (no such .md file)" for n in set(MD_NAME.findall(text)) if n not in MD_NAMES]
    return sorted(bad)


FILES = [p for p in tracked() if p != Path(__file__).resolve()]
MD_NAMES = {p.name for p in FILES if p.suffix == ".md"}
MARKDOWN = [p for p in FILES if p.suffix == ".md"]


def test_the_scan_finds_the_docs() -> None:
    assert len(MARKDOWN) >= 10 and len(FILES) >= 100
    assert sum(len(LINK.findall(p.read_text())) for p in MARKDOWN) >= 30


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(md: Path) -> None:
    assert broken_links(md) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(path: Path) -> None:
    assert missing_paths(path) == []


def test_the_checks_catch_a_dangling_reference(tmp_path: Path) -> None:
    md = tmp_path / "probe.md"
    md.write_text(
        f"# Probe\n[gone](nowhere.md) [anchor]({ROOT}/docs/algorithm.md#no-such-section) "
        f"[ok]({ROOT}/docs/algorithm.md#1-model-twolevelmodel) [ok](#probe)\n"
        "See docs/no-such-guide.md, docs/algorithm.md and ALGORITHM.md.\n"
    )
    assert [b.split(":")[0] for b in broken_links(md)] == [
        "nowhere.md",
        f"{ROOT}/docs/algorithm.md#no-such-section",
    ]
    assert missing_paths(md) == ["ALGORITHM.md (no such .md file)", "docs/no-such-guide.md"]
