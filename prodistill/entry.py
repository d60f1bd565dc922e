"""The `prodistill` executable (and `python -m prodistill`).

`prodistill generate` is dispatched here, before the full command line is imported, because the full command
line imports torch (through the training configuration) and generation must run where torch is not
installed: `generate` lives in the torch-free runtime (`export.runtime.cli`). Every other command, and
`prodistill --help`, goes through `prodistill.cli`, where `generate` is registered as well.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["generate"]:
        from export.runtime.cli import generate

        generate.main(sys.argv[2:], prog_name="prodistill generate")
        return
    from prodistill.cli import main as full_cli

    full_cli()
