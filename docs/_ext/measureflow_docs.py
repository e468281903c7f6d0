"""Sphinx helpers for the measureflow documentation.

``.. measureflow-registry:: KIND`` renders the registry's entries of one kind (fields, integrators,
writers, observables, schedules, executors) as a table read from the installed registry at build
time: name, the object that builds it (linked to its API entry), its parameters with defaults, and
the plugin that registered it. A field added by a new plugin appears without editing the page.
"""

from __future__ import annotations

import functools
import inspect
import re

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

import measureflow

# Where the API reference documents objects: packages document their re-exports under the
# package name, so a class defined in measureflow.integrators.runge_kutta is linked as
# measureflow.integrators.<name>.
_PACKAGES = ("measureflow.integrators", "measureflow.io", "measureflow.run", "measureflow.sweep",
             "measureflow.training", "measureflow.reductions", "measureflow.plot")


def public_path(obj) -> str:
    module = getattr(obj, "__module__", "") or ""
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
    for package in _PACKAGES:
        if module.startswith(package + "."):
            exported = getattr(__import__(package, fromlist=["__all__"]), "__all__", ())
            if name in exported:
                return f"{package}.{name}"
    return f"{module}.{name}"


def _parameters(obj) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parts = []
    for parameter in signature.parameters.values():
        if parameter.name in ("self", "cls"):
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            parts.append(f"*{parameter.name}")
        elif parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
        elif parameter.default is parameter.empty:
            parts.append(parameter.name)
        else:
            default = repr(parameter.default)
            if len(default) > 24:
                default = "…"
            parts.append(f"{parameter.name}={default}")
    text = ", ".join(parts)
    return f"``{text}``" if text else "—"


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    # Table cells are reST: keep the line free of markup that would need its closing half.
    for char in "*`|_":
        first = first.replace(char, "\\" + char)
    return first


class RegistryTable(SphinxDirective):
    """``.. measureflow-registry:: fields`` (the kind, plural as in ``Registry.names``)."""

    required_arguments = 1
    option_spec = {"summary": directives.flag}

    def run(self):
        kind = self.arguments[0]
        registry = measureflow.get_registry()
        names = registry.names(kind)
        with_summary = "summary" in self.options
        header = ["name", "built by", "parameters", "plugin"] + (["what it is"] if with_summary else [])
        rows = []
        for name in sorted(names):
            entry = registry.entry(kind, name)
            obj = entry.obj
            if isinstance(obj, functools.partial):
                built_by = f":class:`~{public_path(obj.func)}` ({getattr(obj.args[0], 'name', '')} tableau)" if obj.args \
                    else f":class:`~{public_path(obj.func)}`"
            elif inspect.isclass(obj) or inspect.isfunction(obj):
                role = "class" if inspect.isclass(obj) else "func"
                built_by = f":{role}:`~{public_path(obj)}`"
            else:
                built_by = f"``{type(obj).__name__}``"
            row = [f"``{name}``", built_by, _parameters(obj), f"``{entry.owner}``"]
            if with_summary:
                row.append(_summary(obj.func if isinstance(obj, functools.partial) else obj))
            rows.append(row)
        lines = [".. list-table::", "   :header-rows: 1", "   :class: registry-table", ""]
        for row in [header, *rows]:
            lines.append(f"   * - {row[0]}")
            lines.extend(f"     - {cell}" for cell in row[1:])
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="measureflow-registry"), self.content_offset, container)
        return container.children


# -- docstrings written as plain text around Unicode formulas -----------------------------------
#
# The project's docstrings are written to be read in a terminal: |x − y|² for norms, displayed
# formulas as more-indented lines, Markdown tables, bullets right after their lead-in line. reST
# reads |…| as a substitution and an unannounced indent as an error. The hook below turns that
# house style into the reST it means, once, when autodoc reads a docstring, so that the source
# stays as it is and the page shows the same text.

_LITERAL = re.compile(r"(``.+?``|:[\w:.-]+:`[^`]*`|`[^`]*`_{0,2}|\$[^$]+\$)")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_BULLET = re.compile(r"^(\s*)([*\-•]|\d+\.)\s+\S")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _escape_pipes(line: str) -> str:
    parts = _LITERAL.split(line)
    for i in range(0, len(parts), 2):  # even parts lie outside literals and roles
        parts[i] = re.sub(r"(?<!\\)\|", r"\\|", parts[i])
    return "".join(parts)


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|")) if line.strip() != "|" else []
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _tables(lines: list[str]) -> list[str]:
    """Markdown pipe tables → list-tables (a header row, a rule row, then the body)."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if (line.strip().startswith("|") and i + 1 < len(lines)
                and _TABLE_RULE.match(lines[i + 1].strip())):
            pad = " " * _indent(line)
            rows = [_split_row(line)]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_split_row(lines[i]))
                i += 1
            width = max(len(row) for row in rows)
            if out and out[-1].strip():
                out.append("")
            out += [f"{pad}.. list-table::", f"{pad}   :header-rows: 1", ""]
            for row in rows:
                row = row + [""] * (width - len(row))
                out.append(f"{pad}   * - {_escape_pipes(row[0]) or ' '}")
                out += [f"{pad}     - {_escape_pipes(cell) or ' '}" for cell in row[1:]]
            out.append("")
            continue
        out.append(line)
        i += 1
    return out


def _blocks(lines: list[str]) -> list[str]:
    """Blank lines where reST needs them: around displayed (more-indented) formulas, after a
    definition or a displayed block when the text dedents, before a bullet list."""
    out: list[str] = []
    para_len = 0        # lines of the current paragraph so far
    base = 0            # where the current paragraph's continuation lines start
    first = ""          # the current paragraph's first line
    in_literal = None   # indent of the paragraph that announced a literal block (::)
    for line in lines:
        if not line.strip():
            out.append(line)
            para_len = 0
            continue
        ind = _indent(line)
        if in_literal is not None:
            if ind > in_literal:
                out.append(line)
                continue
            in_literal = None
            if out and out[-1].strip():
                out.append("")
                para_len = 0
        if para_len:
            prev = out[-1]
            if ind < base:
                out.append("")
                para_len = 0
            elif ind > base:
                if prev.rstrip().endswith("::"):
                    out.append("")
                    para_len, in_literal = 0, _indent(prev)
                    out.append(line)
                    continue
                if para_len == 1 and not _BULLET.match(prev) and not prev.lstrip().startswith(".. "):
                    # a definition-list term: its body starts here
                    para_len, base, first = 0, ind, line
                elif not prev.lstrip().startswith(".. ") and not prev.lstrip().startswith(":"):
                    out.append("")
                    para_len = 0
            elif _BULLET.match(line) and not _BULLET.match(first):
                out.append("")
                para_len = 0
        if para_len == 0:
            bullet = _BULLET.match(line)
            base = len(bullet.group(0)) - 1 if bullet else ind
            first = line
        out.append(line)
        para_len += 1
    return out


def plain_text_docstring(app, what, name, obj, options, lines):
    converted = _tables(_blocks(list(lines)))
    lines[:] = [line if line.lstrip().startswith(".. ") else _escape_pipes(line) for line in converted]


_SECTION = re.compile(r"^\s*(Parameters|Returns|Yields|Raises|Attributes|Other Parameters)\s*$")
_NAME_COLON = re.compile(r"^(\s*)([\w*][\w*, ]*):\s*$")


def numpydoc_names(app, what, name, obj, options, lines):
    """``name:`` on its own line in a numpydoc section means ``name`` (no type): drop the colon,
    which numpydoc would otherwise keep as part of the name."""
    section_indent = None
    for i, line in enumerate(lines):
        if _SECTION.match(line) and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            section_indent = _indent(line)
            continue
        if section_indent is None:
            continue
        match = _NAME_COLON.match(line)
        if match and len(match.group(1)) == section_indent:
            lines[i] = match.group(1) + match.group(2)


def _setup_docstrings(app):
    app.connect("autodoc-process-docstring", numpydoc_names, priority=400)
    # After numpydoc (priority 500), which needs the original section layout.
    app.connect("autodoc-process-docstring", plain_text_docstring, priority=600)


def setup(app):
    app.add_directive("measureflow-registry", RegistryTable)
    _setup_docstrings(app)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
