"""``.. normkit-cases::``: the conformance cases as a table, straight from the case records."""

from __future__ import annotations

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

from normkit.testing.cases import CASES


class CasesDirective(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        table = nodes.table()
        group = nodes.tgroup(cols=4)
        table += group
        for width in (22, 10, 10, 58):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        body = nodes.tbody()
        group += body

        def row(cells: list[str], literal_first: bool = False) -> nodes.row:
            result = nodes.row()
            for index, text in enumerate(cells):
                entry = nodes.entry()
                paragraph = nodes.paragraph()
                paragraph += nodes.literal(text=text) if literal_first and index == 0 else nodes.Text(text)
                entry += paragraph
                result += entry
            return result

        head += row(["id", "op", "dtype", "what it checks"])
        for case in CASES:
            body += row([case.id, case.op, case.dtype, case.purpose], literal_first=True)
        return [table]


def setup(app):
    app.add_directive("normkit-cases", CasesDirective)
    return {"parallel_read_safe": True}
