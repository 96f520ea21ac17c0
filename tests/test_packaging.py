"""Our kernels folder must not shadow the unrelated PyPI package `kernels` that transformers probes.

The folder has no __init__.py: installed, it is the package `semvlp_kernels` (setup.py package_dir);
seen from the repository root as `kernels`, it is a bare namespace package, which transformers
recognizes as "not installed".
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cwd", [REPO, Path("/")], ids=["repo-root", "elsewhere"])
def test_transformers_does_not_see_our_kernels_folder(cwd):
    probe = (
        "import transformers, transformers.utils as u, semvlp_kernels.dispatch;"
        "from transformers import BertModel;"
        "assert not u.is_kernels_available();"
        "print(semvlp_kernels.dispatch.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "semvlp_kernels.dispatch"


def test_kernels_folder_has_no_init_file():
    assert not (REPO / "kernels" / "__init__.py").exists()
