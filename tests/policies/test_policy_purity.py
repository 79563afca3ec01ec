from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_policies_import_neither_torch_nor_httpx_nor_starlette():
    code = (
        "import sys, policies, policies.config, policies.routing, policies.auth, policies.extract, "
        "policies.decisions, policies.reload, policies.cli\n"
        "print(sorted(m for m in ('torch', 'httpx', 'starlette', 'guard', 'proxy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
