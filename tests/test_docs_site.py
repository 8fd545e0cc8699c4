"""The documentation site builds strictly, and no Sphinx role is left to render literally."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# mkdocstrings renders docstrings as Markdown, where a Sphinx role such as :class:`X` is not
# markup: it shows up verbatim (the backticks become <code>) on the API pages.
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj|py:\w+):(?:`|<code>)[^<`]*")


def test_docs_build_strictly_with_no_sphinx_role_in_the_pages(tmp_path):
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = []
    for page in site.rglob("*.html"):
        for match in SPHINX_ROLE.finditer(page.read_text(errors="replace")):
            found.append(f"{page.relative_to(site)}: {match.group(0)}")
    assert not found, "Sphinx roles render literally:\n" + "\n".join(sorted(set(found))[:40])
