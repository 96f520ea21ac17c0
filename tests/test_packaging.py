"""Our files must not shadow the unrelated PyPI package `kernels`, which transformers imports at
`from transformers import ...` whenever it is installed (a dependency of transformers since 5.25).

- kernels/ has no __init__.py: installed, it is the package `semvlp_kernels` (setup.py package_dir);
  seen from the repository root as `kernels`, it is a bare namespace package, which loses to an
  installed package of that name and which transformers recognizes as "not installed" otherwise.
- The benchmark scripts run with benchmarks/ first on sys.path, so a script named like an installed
  top-level module replaces it in that process (benchmarks/kernels.py did: transformers imported it
  and `python benchmarks/throughput.py` died with "cannot import name 'CUDAProperties'").
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def probe(code: str, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cwd", [REPO, Path("/")], ids=["repo-root", "elsewhere"])
def test_transformers_does_not_see_our_kernels_folder(cwd):
    seen = probe(
        "import importlib.util, json, transformers, transformers.utils as u, semvlp_kernels.dispatch;"
        "from transformers import BertModel;"
        "spec = importlib.util.find_spec('kernels');"
        "print(json.dumps({'available': u.is_kernels_available(), 'origin': spec and spec.origin,"
        " 'ours': semvlp_kernels.dispatch.__name__}))",
        cwd,
    )
    assert seen["ours"] == "semvlp_kernels.dispatch"
    if seen["available"]:  # the PyPI package, never our folder
        assert seen["origin"] and "site-packages" in Path(seen["origin"]).parts, seen
    else:
        assert seen["origin"] is None, seen  # not installed, or only our namespace folder


def test_kernels_folder_has_no_init_file():
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_no_benchmark_script_is_named_like_an_installed_module():
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    assert "throughput" in scripts
    taken = probe(
        f"import importlib.util, json; print(json.dumps([s for s in {scripts!r} if importlib.util.find_spec(s)]))",
        Path("/"),
    )
    assert taken == [], f"benchmarks/{taken[0]}.py would replace the installed module {taken[0]!r} in its process"
