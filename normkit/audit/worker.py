"""``python -m normkit.audit.worker NAME [CASE_ID ...]``: audit one built-in adapter in this
process and print its report as one line of JSON (the audit runs adapters that need their own
environment, such as Keras's backend, this way)."""

from __future__ import annotations

import json
import sys

from normkit.audit.builtin import builtin_adapters
from normkit.audit.run import AUDIT_CASES, audit_adapter, report_to_json
from normkit.testing.cases import get_case


def main(argv: list[str]) -> int:
    name, *case_ids = argv
    adapters = {adapter.name: adapter for adapter in builtin_adapters()}
    if name not in adapters:
        print(f"no built-in audit adapter named {name!r}; known: {sorted(adapters)}", file=sys.stderr)
        return 2
    cases = [get_case(i) for i in case_ids] if case_ids else list(AUDIT_CASES)
    report = audit_adapter(adapters[name], cases)
    print(json.dumps(report_to_json(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
