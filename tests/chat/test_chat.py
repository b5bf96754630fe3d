import io

import pytest
import torch

from edgetune import api
from edgetune.chat.generation import GenerationSettings, prompt_ids
from edgetune.cli import main
from edgetune.errors import EdgetuneError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat(tiny_runs):
    return api.open_chat(str(tiny_runs["nf4"]))


def greedy_by_hand(chat, prompt: str, new_tokens: int) -> str:
    """What the attached model answers greedily, one full forward per token (no cache): the reference."""
    ids = prompt_ids(chat, [{"role": "user", "content": prompt}], GenerationSettings())
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = chat.model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return chat.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_a_run_answers_greedily_as_its_adapted_model_does(chat, tiny_runs):
    assert "adapters" in chat.description and chat.device.type == "cpu" and chat.has_chat_template
    prompt = chat.tokenizer.decode(prompt_ids(chat, [{"role": "user", "content": "hi"}], GenerationSettings())[0])
    assert prompt.endswith("<|im_start|>assistant\n")  # the run's chat template, ready for the answer
    answer = "".join(api.generate(chat, "hello world", temperature=0, max_new_tokens=6))
    assert answer == greedy_by_hand(chat, "hello world", 6) and answer
    assert answer == "".join(api.generate(str(tiny_runs["nf4"]), "hello world", temperature=0, max_new_tokens=6))


def test_a_seed_repeats_a_sampled_answer(chat):
    first = "".join(api.generate(chat, "the quick", temperature=1.0, top_p=1.0, seed=3, max_new_tokens=8))
    again = "".join(api.generate(chat, "the quick", temperature=1.0, top_p=1.0, seed=3, max_new_tokens=8))
    assert first == again


def test_cancelling_ends_the_answer_within_a_token(chat):
    pieces = []
    for piece in api.generate(chat, "the quick", temperature=0, max_new_tokens=40, cancel=lambda: len(pieces) >= 2):
        pieces.append(piece)
    full = "".join(api.generate(chat, "the quick", temperature=0, max_new_tokens=40))
    assert 2 <= len(pieces) <= 4 and len("".join(pieces)) < len(full)


def test_full_runs_and_bare_models_answer_too(tiny_runs, tiny_trainable_dir):
    full = api.open_chat(str(tiny_runs["full"]))
    bare = api.open_chat(model=str(tiny_trainable_dir))
    assert "fully fine-tuned" in full.description and "no fine-tuning" in bare.description
    for model in (full, bare):
        assert "".join(api.generate(model, "hello", temperature=0, max_new_tokens=4)) == greedy_by_hand(
            model, "hello", 4
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(EdgetuneError, match=message):
        GenerationSettings(**settings)


def test_chat_from_a_pipe_answers_one_line_per_prompt(tiny_runs, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\nthe quick brown\n"))
    code = main(["chat", str(tiny_runs["bf16"]), "--temperature", "0", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 2  # the blank input line is skipped


def test_generate_prints_one_answer(tiny_runs, capsys):
    code = main(["generate", str(tiny_runs["bf16"]), "hello", "world", "--temperature", "0", "--max-new-tokens", "4"])
    assert code == 0 and capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["chat", "RUN"], "\n  \n", "stdin held no prompt"),
        (["chat"], "hi\n", "name one thing to talk to"),
        (["chat", "NOWHERE"], "hi\n", "is neither an edgetune run folder nor a model folder"),
        (["generate", "RUN", "hi", "--top-p", "2"], "", "top_p=2.0 is out of range"),
        (["chat", "RUN/adapter"], "hi\n", "pass --base MODEL (the adapter names"),
        (["chat", "RUN", "--base", "NOWHERE"], "hi\n", "drop --base"),
    ],
)
def test_bad_chat_input_is_one_line(tiny_runs, tmp_path, monkeypatch, capsys, argv, stdin, message):
    names = {"RUN": tiny_runs["bf16"], "RUN/adapter": tiny_runs["bf16"] / "adapter", "NOWHERE": tmp_path / "NOWHERE"}
    argv = [str(names.get(a, a)) for a in argv]
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_a_checkpoint_and_a_foreign_adapter_answer_as_the_run_does(tiny_runs, tiny_trainable_dir, tmp_path):
    """The bf16 run's last checkpoint is its final step; its adapter alone, on --base, is the same model."""
    import shutil

    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tiny_runs["bf16"] / "adapter" / name, foreign / name)
    run = "".join(api.generate(str(tiny_runs["bf16"]), "hello world", temperature=0, max_new_tokens=6))
    checkpoint = api.open_chat(str(tiny_runs["bf16"] / "checkpoints" / "step-000003"))
    adapter = api.open_chat(str(foreign), base=str(tiny_trainable_dir))
    assert "adafish-lora adapters" in checkpoint.description and "peft-adapter adapters" in adapter.description
    for chat in (checkpoint, adapter):
        assert "".join(api.generate(chat, "hello world", temperature=0, max_new_tokens=6)) == run
