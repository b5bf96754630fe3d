"""Adapters that travel: every LoRA checkpoint holds a peft adapter folder, and `train.init_adapter` starts from one.

The checkpoints are those of the session's tiny runs (conftest ``tiny_runs``: three steps, the last one
checkpointed); the init_adapter run continues the bf16 run's finished adapter on the same data.
"""

import json

import pytest
import torch
import yaml
from conftest import tiny_train_overrides
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from edgetune import api
from edgetune.errors import EdgetuneError
from edgetune.train import loop
from edgetune.train.checkpoint import list_checkpoints, save_checkpoint
from edgetune.train.config_file import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
IDENTITY = {"model": "tiny", "architecture": "0123", "strategy": "adafish-lora"}


def checkpoint_of(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


@pytest.mark.parametrize("key", ["bf16", "nf4"])
def test_a_checkpoints_adapter_loads_with_peft_and_equals_its_tensors(key, tiny_runs, tiny_trainable_dir):
    checkpoint = checkpoint_of(tiny_runs[key])
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    assert list_checkpoints(tiny_runs[key], verify=True)[0].problem is None
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_trainable_dir), checkpoint / "adapter")
    tensors = load_file(str(checkpoint / "tensors.safetensors"))
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    provenance = json.loads((checkpoint / "adapter" / "edgetune-source.json").read_text())
    assert provenance["strategy"] == json.loads((tiny_runs[key] / "summary.json").read_text())["strategy"]


def test_a_damaged_adapter_file_fails_the_manifest(tiny_runs, tmp_path):
    import shutil

    run = shutil.copytree(tiny_runs["bf16"], tmp_path / "run")
    weights = checkpoint_of(run) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert (
        "adapter/adapter_model.safetensors does not match the sha256" in list_checkpoints(run, verify=True)[0].problem
    )


def test_a_manifest_may_list_only_plain_names_in_adapter(tmp_path):
    def writer(folder):
        folder.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_text("{}")

    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, identity=IDENTITY, keep=2, write_adapter=writer)
    manifest = json.loads((path / "manifest.json").read_text())
    assert list_checkpoints(tmp_path, verify=True)[0].problem is None
    manifest["files"]["adapter/../../../x"] = manifest["files"].pop("adapter/adapter_config.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "its manifest lists files" in list_checkpoints(tmp_path)[0].problem


@pytest.fixture(scope="module")
def continued(tiny_runs, tiny_trainable_dir, tmp_path_factory, request):
    """A new run that starts from the bf16 run's adapter, with the first step's starting weights recorded."""
    source = tiny_runs["bf16"]
    text = yaml.safe_load((source / "config.yaml").read_text())["data"]["path"]
    started = {}
    original = loop.run_step

    def recording(strategy, model, *args, **kwargs):
        if not started:
            started.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return original(strategy, model, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(loop, "run_step", recording)
    extra = ("train.strategy=adamw-lora-gc", f"train.init_adapter={source / 'adapter'}")
    run_dir = tmp_path_factory.mktemp("continued") / "run"
    try:
        result = api.train(api.train_config(None, tiny_train_overrides(tiny_trainable_dir, text, run_dir, 2, *extra)))
    finally:
        patch.undo()
    return result, started


def test_init_adapter_starts_from_the_adapters_weights(continued, tiny_runs):
    result, started = continued
    adapter = load_file(str(tiny_runs["bf16"] / "adapter" / "adapter_model.safetensors"))
    renamed = {
        n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): t
        for n, t in adapter.items()
    }
    assert started.keys() == renamed.keys()
    assert all(torch.equal(started[name], renamed[name]) for name in renamed)
    # Same base, adapters and held-out split: the new run's loss before equals the old run's loss after.
    before = json.loads((tiny_runs["bf16"] / "summary.json").read_text())["val_loss_after"]
    assert result.val_loss_before == pytest.approx(before, rel=1e-5)
    assert result.status == "finished" and result.steps_done == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("lora.rank=8",), "has rank 16 and alpha 32, but the config has lora.rank=8 and lora.alpha=32"),
        (
            ("lora.targets=[q_proj,v_proj]",),
            "set lora.targets=[down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj]",
        ),
        (("train.strategy=mezo-full",), "trains every parameter"),
    ],
)
def test_an_init_adapter_of_another_shape_is_one_line(extra, message, tiny_runs, tiny_trainable_dir, tmp_path):
    overrides = tiny_train_overrides(tiny_trainable_dir, "unused.txt", tmp_path / "run", 2)
    overrides += ["train.strategy=adamw-lora-gc", f"train.init_adapter={tiny_runs['bf16'] / 'adapter'}", *extra]
    text = yaml.safe_load((tiny_runs["bf16"] / "config.yaml").read_text())["data"]["path"]
    overrides[1] = f"data.path={text}"
    with pytest.raises(EdgetuneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        api.train(load_config(None, overrides))
    assert not (tmp_path / "run").exists()
