"""Every launcher's --help opens with what it runs (its config's docstring), not a dataclass signature,
and explains every option with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from semvlp.run_config import RunConfig

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.py")))
def test_launcher_help_describes_the_job(script, capsys, load_launcher):
    module = load_launcher(script)
    configs = [
        c for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, RunConfig) and c.__module__ == module.__name__
    ]  # fmt: skip
    assert len(configs) == 1, configs
    with pytest.raises(SystemExit):
        configs[0].from_args(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert not description.startswith(f"{configs[0].__name__}("), description
    assert "fine-tuning" in description or "pre-training" in description, description

    options = text.split("\noptions:\n")[1]
    entries = dict(re.findall(r"^  (--\w+)(.*?)(?=^  -|\Z)", options, flags=re.M | re.S))  # flag -> its lines
    for field in dataclasses.fields(configs[0]):
        words = " ".join(entries[f"--{field.name}"].split())
        meaning = re.sub(r"^[A-Z_]+ |\(default: .*\)$", "", words).strip()  # without metavar and default
        assert meaning, (field.name, words)
        if field.default is not dataclasses.MISSING:
            assert words.endswith(f"(default: {field.default})"), (field.name, words)
