import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_the_readme_opens_with_exactly_two_commands():
    main_job, tests = readme_commands()
    assert "edgetune " in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


LLAMA = dict(model_type="llama", hidden_act="silu", num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
README_MODELS = {  # the configs the planner section's examples name (Llama 3.1 8B and Llama 3.2 3B)
    "llama-3.1-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    "llama-3.2-3b": dict(
        LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128
    ),
}


def readme_plan_examples() -> list[list[str]]:
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [line.split()[3:] for line in text.splitlines() if line.startswith("$ edgetune plan ")]


def test_every_plan_example_in_the_readme_runs(tmp_path, monkeypatch, capsys):
    import json

    from edgetune.cli import main

    for name, config in README_MODELS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    examples = readme_plan_examples()
    assert len(examples) >= 5
    for argv in examples:
        assert main(["plan", *argv]) == 0, argv
    assert "cheapest change that fits" in capsys.readouterr().out
