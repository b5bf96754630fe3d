"""bench/adafish_variants.py: every named variant builds a valid AdaFish and takes run_step's steps; the screen runs."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "adafish_variants.py"


def variants_module():
    spec = importlib.util.spec_from_file_location("adafish_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_are_named_kwargs_of_adafish():
    module = variants_module()
    assert isinstance(module.VARIANTS, dict) and "default" in module.VARIANTS and module.VARIANTS["default"] == {}
    for name in ("true-fisher", "damping-decay", "power-1", "graft", "ema-0.9", "inv-every-10"):
        assert name in module.VARIANTS, name


@pytest.mark.parametrize("name", list(variants_module().VARIANTS))
def test_every_variant_trains_through_run_step(name):
    module = variants_module()
    run = module.train("adafish", module.VARIANTS[name], lr=3e-3, steps=3, eval_every=3)
    assert all(math.isfinite(v) for v in run["losses"]) and math.isfinite(run["evals"][3])


def test_the_screen_prints_a_row_per_variant(capsys):
    assert variants_module().main(["--steps", "2", "--eval-every", "1", "--lrs", "1e-3", "--variants", "default"]) == 0
    out = capsys.readouterr().out
    assert "AdamW (lr 0.001)" in out and out.strip().splitlines()[-1].startswith("default")
