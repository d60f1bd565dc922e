"""The `prodistill` executable (and `python -m prodistill`).

`prodistill generate` and `prodistill serve` are dispatched here, before the full command line is imported,
because the full command line imports torch (through the training configuration) and generation and serving
must run where torch is not installed: both live beside the torch-free runtime (`export.runtime.cli`,
`export.serve.cli`). Every other command, and `prodistill --help`, goes through `prodistill.cli`, where both are
registered as well.
"""

from __future__ import annotations

import importlib
import sys

TORCH_FREE = {"generate": "export.runtime.cli", "serve": "export.serve.cli"}
"""Command → the module that defines it (as a click command of the same name)."""


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in TORCH_FREE:
        click_command = getattr(importlib.import_module(TORCH_FREE[command]), command)
        click_command.main(sys.argv[2:], prog_name=f"prodistill {command}")
        return
    from prodistill.cli import main as full_cli

    full_cli()
