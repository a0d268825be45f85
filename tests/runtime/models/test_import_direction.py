"""The models never import the engine (the engine imports the models): no import cycle."""

from __future__ import annotations

import subprocess
import sys


def test_models_import_without_the_engine():
    code = (
        "import sys, importlib, pkgutil\n"
        "import lmforge.runtime.models as m\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    importlib.import_module(f'lmforge.runtime.models.{info.name}')\n"
        "print(sorted(n for n in sys.modules if n.startswith('lmforge.runtime.engine')))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
