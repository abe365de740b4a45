"""The training stack imports without pydantic: the GPU device image ships torch, not the app deps."""

from __future__ import annotations

import subprocess
import sys

BLOCK_PYDANTIC = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("pydantic", "pydantic_settings", "pydantic_core", "dotenv"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
for mod in ("rag.llm.model", "rag.llm.generate", "rag.llm.checkpoint", "rag.llm.data",
            "rag.llm.train", "rag.llm.align", "bench.llm"):
    __import__(mod)
assert "pydantic" not in sys.modules
print("ok")
"""


def test_llm_modules_import_without_pydantic():
    done = subprocess.run([sys.executable, "-c", BLOCK_PYDANTIC], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
