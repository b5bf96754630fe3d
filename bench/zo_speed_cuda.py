"""Full-parameter zeroth-order steps on one CUDA GPU: edgetune's MeZO, HiZOO and FZOO against MeZO's reference step.

    python bench/zo_speed_cuda.py                       # one CUDA GPU, about a minute
    python bench/zo_speed_cuda.py --lora                # the forward-only rungs' parameters: LoRA r=8 over NF4
    python bench/zo_speed_cuda.py --dry-run --out /tmp/zo   # the same plumbing on the CPU, a 2-layer model

The CPU figures (bench/optimizers.py --sections speed) are bound by random-number generation; on a GPU drawing is
cheap and the question is the other one: do the chunked, in-place sweeps (one generator refill and a few elementwise
kernels per chunk) cost more launches than the reference's whole-tensor ``torch.normal`` calls, and what memory does
each step add on top of the weights? The model is SmolLM2-135M's shape (bench/gpu_check.py CONFIGS) with random bf16
weights (speed does not depend on their values), batch 4 x 128 of random token ids, as bench/optimizers.py.
``--lora`` measures what the forward-only rung trains instead: LoRA r=8 (alpha 16) on all seven linears of each layer
over an NF4 base (``load_model``), 420 small tensors where launch overhead, not bandwidth, sets the sweep's cost.

Each step is timed between ``torch.cuda.synchronize()`` calls, interleaved with the others and a plain forward pass
over the same rounds (bench/optimizers.py ``interleaved``), median of ``--reps`` after one warm-up. The memory
column is ``max_memory_allocated`` during the step, less what was allocated before it, less the same for a plain
forward: what the step's perturbations add (the reference MeZO builds z and the perturbed weights out of place,
edgetune's steps perturb in place with one chunk of scratch per worker).

Writes OUT/zo_speed_cuda.json and OUT/zo_speed_cuda.md (``zo_speed_cuda_lora.*`` with --lora; OUT is --out,
default bench/results).
"""

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # edgetune from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import CONFIGS, SMOLLM2, shrink  # noqa: E402
from optimizers import ZO_EPS, interleaved, reference_mezo_step  # noqa: E402

from edgetune.optim import FZOO, HiZOO, MeZO  # noqa: E402
from edgetune.plan.sources import ModelSource  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model  # noqa: E402

BATCH, SEQ = 4, 128
LR = 1e-7  # small enough that the timed steps leave the weights where they were, to bf16 precision


def build(dry_run: bool, lora: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cpu" if dry_run else "cuda"
    config = AutoConfig.for_model(**(shrink(CONFIGS[SMOLLM2]) if dry_run else CONFIGS[SMOLLM2]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if lora:  # through a saved folder, as edgetune train loads a model
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            source = ModelSource(name="random", kind="folder", path=Path(folder), has_weights=True)
            model = load_model(source, "nf4", device=device, lora=LoraSettings(rank=8, alpha=16.0))
    model = model.to(device).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    return model, {"input_ids": ids, "labels": ids}, device


def steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str) -> dict:
    """The timed functions, each ending in a device synchronize, and the optimizers to close afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    seeds = iter(range(10**6))
    optimizers = {
        "mezo_step (rademacher)": MeZO(params, lr=LR, eps=ZO_EPS),
        "mezo_step (gaussian)": MeZO(params, lr=LR, eps=ZO_EPS, perturbation="gaussian"),
        "hizoo_step (sparse)": HiZOO(params, lr=LR, eps=ZO_EPS, hessian_smooth=1e-8),
        "fzoo_step (8 directions)": FZOO(params, lr=LR, eps=ZO_EPS),
    }

    def closure() -> torch.Tensor:
        return model(**batch).loss

    def synced(fn):
        def run() -> None:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        return run

    fns = {"forward": synced(torch.no_grad()(closure))}
    fns["reference_mezo_step"] = synced(lambda: reference_mezo_step(params, closure, LR, next(seeds)))
    fns |= {name: synced(lambda opt=opt: opt.step(closure)) for name, opt in optimizers.items()}
    return {"fns": fns, "optimizers": optimizers, "params": sum(p.numel() for p in params)}


def added_peaks(fns: dict, device: str) -> dict[str, int | None]:
    """Bytes each step allocates above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return dict.fromkeys(fns)
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        peaks[name] = torch.cuda.max_memory_allocated() - before
    return peaks


def render(results: dict) -> str:
    meta, rows = results["meta"], results["timings"]
    forward, reference = rows["forward"]["median_s"], rows["reference_mezo_step"]["median_s"]
    lines = [
        f"# Zeroth-order steps on CUDA: {meta['trained']}",
        "",
        f"`{meta['command']}` on {meta['date']}; {meta['device']}, torch {meta['torch']}; SmolLM2-135M shape, "
        f"random weights, {meta['params']:,} {meta['trained']}, batch {BATCH} x {SEQ}; median of {meta['reps']} "
        "interleaved rounds after one warm-up.",
        "",
        "| step | median ms | x reference MeZO step | x forward | peak beyond a forward's, MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, timing in rows.items():
        peak, base = results["added_peak_bytes"][name], results["added_peak_bytes"]["forward"]
        lines.append(
            f"| {name} | {1e3 * timing['median_s']:.2f} | {timing['median_s'] / reference:.3f} | "
            f"{timing['median_s'] / forward:.2f} | {'-' if peak is None else f'{(peak - base) / 2**20:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a 2-layer model: check the plumbing")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 over an NF4 base instead of all parameters")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("zo_speed_cuda: no CUDA device; run on a GPU, or with --dry-run", file=sys.stderr)
        return 2
    started = time.monotonic()
    model, batch, device = build(args.dry_run, args.lora)
    built = steps(model, batch, device)
    timings = interleaved(built["fns"], args.reps)
    peaks = added_peaks(built["fns"], device)
    for opt in built["optimizers"].values():
        opt.close()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})"
    command = "python bench/zo_speed_cuda.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    meta = dict(
        command=command,
        date=datetime.date.today().isoformat(),
        device=name,
        torch=torch.__version__,
        params=built["params"],
        trained="LoRA r=8 parameters over an NF4 base" if args.lora else "bf16 parameters (all of them)",
        reps=args.reps,
        seconds=round(time.monotonic() - started, 1),
    )
    results = {"meta": meta, "timings": timings, "added_peak_bytes": peaks}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "zo_speed_cuda_lora" if args.lora else "zo_speed_cuda"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
