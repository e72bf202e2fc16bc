"""The docs stay true to the code: the generated configuration page, the README's shape and its links."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from skinsynth.config import ExperimentConfig
from skinsynth.configdoc import REGENERATE, config_reference_markdown, field_comments

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PAGE = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"


def _stale_message(committed: str, generated: str) -> str | None:
    """None when the committed page is current, else what to run."""
    if committed == generated:
        return None
    return f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (a mapping of sections, tune.space, as ``tune.space.<key>.*``)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, path)
        else:
            keys.append(path)
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                keys += _leaf_keys(typing.get_args(tp)[1], f"{path}.<key>")
    return keys


def _row(page: str, key: str) -> str | None:
    """The table row of a dotted key in the configuration page."""
    for line in page.splitlines():
        if line.startswith(f"| `{key}` |"):
            return line
    return None


def test_configuration_page_is_current() -> None:
    generated = config_reference_markdown()
    committed = CONFIG_PAGE.read_text() if CONFIG_PAGE.is_file() else ""
    message = _stale_message(committed, generated)
    assert message is None, message
    # the comparison notices a change: one edited row makes the page stale, and the message says how to fix it
    mutated = committed.replace("| `data.split.label_fraction` |", "| `data.split.label_fractions` |", 1)
    assert mutated != committed
    assert REGENERATE in (_stale_message(mutated, generated) or "")


def test_every_config_field_is_documented_with_its_comment() -> None:
    page = config_reference_markdown()
    keys = _leaf_keys(ExperimentConfig)
    assert len(keys) > 100
    missing = [key for key in keys if _row(page, key) is None]
    assert not missing, f"config keys missing from the reference: {missing}"
    # a known field: its row holds its default and the comment beside it in config.py
    comment = "share of train images whose label is visible; the rest is the SSL pool"
    from skinsynth.config import SplitConfig

    assert field_comments(SplitConfig)["label_fraction"] == comment
    row = _row(page, "data.split.label_fraction")
    assert row is not None and "`1.0`" in row and comment in row
    # comment lines above a field join its trailing comment; a wrapped default keeps its trailing comment
    from skinsynth.config import AuditConfig, TrainConfig

    assert field_comments(TrainConfig)["sampling"].startswith('class-balanced sampling: "balanced" repeats')
    assert field_comments(AuditConfig)["utility"].startswith("Classification Accuracy Score")
    assert field_comments(TrainConfig)["lr"] == ""
    # and the check can fail: a page without that row is caught
    stripped = page.replace(row + "\n", "")
    assert _row(stripped, "data.split.label_fraction") is None


def _readme_problems(text: str) -> list[str]:
    problems = []
    lines = text.splitlines()
    if len(lines) > 250:
        problems.append(f"README.md has {len(lines)} lines (at most 250)")
    for pattern in (r"^python3 -m venv .+pytest", r"^python3 -m venv .+skinsynth demo"):
        count = sum(1 for line in lines if re.search(pattern, line))
        if count != 1:
            problems.append(f"README.md has {count} lines matching {pattern!r} (exactly 1)")
    return problems


def test_readme_is_short_and_holds_the_quick_start_lines() -> None:
    text = README.read_text()
    assert _readme_problems(text) == []
    # the checks can fail
    assert _readme_problems(text + "\n" * 251)
    assert _readme_problems(text.replace("python3 -m venv", "python -m venv"))
    doubled = text.replace("```bash\n", "```bash\n" + next(ln for ln in text.splitlines() if "pytest" in ln) + "\n", 1)
    assert _readme_problems(doubled)


def _broken_doc_links(text: str, base: Path) -> list[str]:
    """Relative Markdown links into docs/ whose target file does not exist (anchors ignored)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#", 1)[0]
        if re.match(r"^[a-z]+:", target) or not path.startswith(("docs/", "./docs/")):
            continue
        if not (base / path).is_file():
            broken.append(target)
    return broken


def test_readme_links_into_docs_resolve() -> None:
    text = README.read_text()
    links = re.findall(r"\]\((?:\./)?docs/[^)\s]+\)", text)
    assert len(links) >= 10
    assert _broken_doc_links(text, ROOT) == []
    assert _broken_doc_links("[x](docs/no-such-page.md#a)", ROOT) == ["docs/no-such-page.md#a"]


@pytest.mark.parametrize("page", ["index.md", "getting-started.md", "results.md", "run-directory.md"])
def test_docs_pages_exist(page: str) -> None:
    assert (ROOT / "docs" / page).is_file()
