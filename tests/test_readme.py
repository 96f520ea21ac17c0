"""README.md is the user's manual: its Python examples run as written, and every file and module
its commands name exists (the commands themselves are run by the tests of their scripts)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

from _launch import make_demo_command

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = "\n".join(code for lang, code in BLOCKS if lang == "bash")


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_model_example_prints_the_shapes_of_both_streams(tmp_path):
    (example,) = [code for code in PYTHON if "SemVLPModel(" in code]
    printed = run_python(example, tmp_path).strip().splitlines()[-1]
    # text [B, T, d]; image [B, 1 + K, d] (the [IMG] token and the 100 objects); pooled [B, d]
    assert printed == "torch.Size([2, 12, 128]) torch.Size([2, 101, 128]) torch.Size([2, 128])"


def test_the_bert_example_runs_on_a_bert_folder(tmp_path):
    from transformers import BertConfig, BertForPreTraining

    folder = tmp_path / "bert-base-uncased"
    # BERT-base's 12 layers (the example keeps the default L_s = 6), narrower and with a small vocabulary.
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64
    )
    BertForPreTraining(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(f"[unused{i}]" for i in range(99)) + "\n")
    (example,) = [code for code in PYTHON if "init_from_bert" in code]
    assert "/path/to/bert-base-uncased" in example
    printed = run_python(example.replace("/path/to/bert-base-uncased", str(folder)), tmp_path)
    assert "semvlp.visual_embeddings.projection.weight" in printed
    assert "semvlp.encoder.layers.0.attention.qkv.weight" not in printed  # loaded from BERT, not new


def test_every_file_and_module_the_commands_name_exists():
    files = set(re.findall(r"(?<![\w/])((?:launch|benchmarks|ds_configs|docs)/[\w./-]+\.(?:py|json|sh|md))", COMMANDS))
    assert {"launch/pretrain.py", "ds_configs/v100.json", "benchmarks/throughput.py"} <= files
    assert [f for f in sorted(files) if not (REPO / f).is_file()] == []
    modules = set(re.findall(r"python -m ([\w.]+)", COMMANDS))
    assert "semvlp.data.convert" in modules
    assert [m for m in sorted(modules) if importlib.util.find_spec(m) is None] == []


def test_the_demo_command_is_what_make_demo_runs():
    commands = COMMANDS.replace("\\\n", " ").splitlines()
    (shown,) = [line for line in commands if "launch/pretrain.py" in line and "--output_dir runs/demo " in line]
    makefile = [token.replace("$(VENV)/bin/", "") for token in make_demo_command()]
    assert shlex.split(shown) == makefile
