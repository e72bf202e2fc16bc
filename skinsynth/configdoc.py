"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

:mod:`skinsynth.config` is the one place a setting is defined: its type, its default and, in a comment beside it,
what it means. This module walks the :class:`~skinsynth.config.ExperimentConfig` tree and writes one Markdown
section per config section (``## data.preprocess``), one table row per key with its dotted name, type, default and
the comment text attached to the field in the source (comment lines directly above it and a trailing comment on
it). ``tests/test_docs.py`` fails when the committed page differs from what this produces.

Regenerate with ``python -m skinsynth.configdoc > docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from skinsynth import config
from skinsynth.config import ExperimentConfig

REGENERATE = "python -m skinsynth.configdoc > docs/configuration.md"


def field_comments(cls: type) -> dict[str, str]:
    """The comment text attached to each field of a dataclass in its source.

    A field's comment is the run of ``#`` lines directly above it (no blank line between) followed by the trailing
    comment on its own lines; a field without either gets ``""``. A multi-line field (a default wrapped in
    parentheses) keeps a trailing comment from any of its lines.

    Args:
        cls: a dataclass defined in a source file.

    Returns:
        field name -> comment text, ``#`` markers stripped and lines joined with spaces.
    """
    source = inspect.getsource(cls)
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}  # 1-based line number -> comment text on that line
    code_lines: set[int] = set()  # lines holding anything other than a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(line)
    result: dict[str, str] = {}
    body_indent = None
    number = 0
    while number < len(lines):
        number += 1
        text = lines[number - 1]
        stripped = text.strip()
        indent = len(text) - len(text.lstrip())
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if body_indent is None and name in names:
            body_indent = indent
        if name not in names or indent != body_indent or stripped.startswith("#"):
            continue
        above: list[str] = []
        previous = number - 1
        while previous >= 1 and previous in comments and previous not in code_lines:
            above.insert(0, comments[previous])
            previous -= 1
        # the statement may continue over several lines (a parenthesised default): take trailing comments of each
        last = number
        depth = _bracket_depth(text)
        while depth > 0 and last < len(lines):
            last += 1
            depth += _bracket_depth(lines[last - 1])
        trailing = [comments[i] for i in range(number, last + 1) if i in comments and i in code_lines]
        result[name] = " ".join(part for part in above + trailing if part)
        number = last
    return {name: result.get(name, "") for name in names}


def _bracket_depth(line: str) -> int:
    code = line.split("#", 1)[0]
    return sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")


def _type_text(tp: Any) -> str:
    return config._type_name(tp)


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every config field has a default
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if value == {} or value == []:
        return "{}" if isinstance(value, dict) else "[]"
    return repr(value)


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, and ``<`` as an entity so that ``<scheme>`` is not read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _sections(cls: type, prefix: str) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for ``cls`` and every dataclass below it, depth first, in field order; the
    values of a mapping of dataclasses (``tune.space``) appear as ``<prefix>.<key>``."""
    found = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            found += _sections(tp, path)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            found += _sections(typing.get_args(tp)[1], f"{path}.<key>")
    return found


def config_reference_markdown() -> str:
    """The configuration reference page: every key of every config section with type, default and comment.

    Returns:
        Markdown text, ending with a newline; ``docs/configuration.md`` holds exactly this.
    """
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from skinsynth/config.py by skinsynth/configdoc.py: do not edit by hand. -->",
        "",
        "This page is generated from the config dataclasses in `skinsynth/config.py` and the comments beside their",
        f"fields. Regenerate it with `{REGENERATE}`;",
        "`tests/test_docs.py` fails when it is stale.",
        "",
        "One experiment file (`experiments/*.yaml`) holds one section per stage. Any key can be overridden on the",
        "command line with its dotted name, `--set data.split.label_fraction=0.1` (values are parsed as YAML",
        "scalars and type-checked). An unknown key is an error that names the nearest valid spelling, and the fully",
        "resolved config is written to `RUN_DIR/config.yaml` and into every stage's manifest.",
        "",
    ]
    for prefix, cls in _sections(ExperimentConfig, ""):
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if not prefix:  # the top level holds only sections
            continue
        out += [f"## {_cell(prefix)}", ""]
        doc = inspect.cleandoc(cls.__doc__ or "")
        if doc:  # reStructuredText literals (``x``) as Markdown code (`x`)
            out += [" ".join(doc.replace("``", "`").split()), ""]
        if not leaves:
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in leaves:
            tp = hints[f.name]
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                type_text = f"mapping of str -> {prefix}.{f.name}.<key> (below)"
            else:
                type_text = _type_text(tp)
            out.append(
                f"| `{prefix}.{f.name}` | {_cell(type_text)} | `{_cell(_default_text(f))}` "
                f"| {_cell(comments.get(f.name, ''))} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    """Print the configuration reference (``python -m skinsynth.configdoc > docs/configuration.md``)."""
    print(config_reference_markdown(), end="")


if __name__ == "__main__":
    main()
