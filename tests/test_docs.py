"""The README and docs/: every relative link points at a file of the repository, and every #anchor at a heading."""

import os
import re

import pytest
from conftest import ROOT

DOCS = ["README.md", "benchmarks/README.md"] + [
    f"docs/{name}" for name in sorted(os.listdir(os.path.join(ROOT, "docs"))) if name.endswith(".md")
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
    return {anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(doc: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return [(doc, target) for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_anchor_follows_githubs_rule():
    assert (
        anchor("Beyond the paper: fingerprint-adaptive diffusion")
        == "beyond-the-paper-fingerprint-adaptive-diffusion"
    )
    assert anchor("The two commands") == "the-two-commands"
    assert anchor("`configs/` and overrides") == "configs-and-overrides"


@pytest.mark.parametrize("doc,target", [pair for doc in DOCS for pair in links(doc)])
def test_relative_links_point_at_files_and_headings(doc, target):
    path, _, fragment = target.partition("#")
    resolved = (
        os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
    )
    assert os.path.exists(resolved), f"{doc} links to {target}: {resolved} does not exist"
    if fragment:
        assert resolved.endswith(".md"), f"{doc} links to an anchor in {path}, which is not Markdown"
        assert fragment in anchors(resolved), (
            f"{doc} links to {target}: no heading '#{fragment}' in {path or doc}"
        )


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    linked = {
        os.path.normpath(os.path.join(os.path.dirname(d), t.partition("#")[0]))
        for d in DOCS
        for d, t in links(d)
    }
    for doc in DOCS[1:]:
        assert os.path.normpath(doc) in linked, f"{doc} is not linked from the README or docs/"
