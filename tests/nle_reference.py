"""Loads BALROG's compiled C++ describer built by ``scripts/build_nle_reference.sh``.

``load()`` returns ``(NLELanguageObsv instance, None)`` or ``(None, reason)``. The package's
``__init__`` imports the old ``gym``, so the extension module is loaded straight from its file.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, ".cache", "nle_reference")


def reference_dir() -> str:
    return os.environ.get("NLE_REF_DIR") or DEFAULT_DIR


@functools.lru_cache(maxsize=1)
def load():
    where = reference_dir()
    found = glob.glob(os.path.join(where, "nle_language_wrapper", "nle_language_obsv*.so"))
    if not found:
        failed = os.path.join(where, "FAILED")
        if os.path.exists(failed):
            with open(failed, encoding="utf-8", errors="replace") as f:
                lines = f.read().strip().splitlines()
            return None, f"the reference build failed ({lines[0] if lines else 'no detail'}); see {failed}"
        return None, f"no reference build in {where}; run scripts/build_nle_reference.sh"
    try:
        spec = importlib.util.spec_from_file_location("nle_language_obsv", found[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.NLELanguageObsv(), None
    except Exception as e:  # a broken build reads as "absent", with the reason
        return None, f"cannot load {found[0]}: {type(e).__name__}: {e}"
