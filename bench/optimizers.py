"""Optimizer benchmark on SmolLM2-135M: step speed, convergence and peak memory of edgetune's strategies.

    .venv/bin/python bench/optimizers.py [--quick] [--sections speed,memory,zo,convergence]

Writes bench/results/optimizers.json and bench/results/optimizers.md (a run of some sections keeps the others'
last results). What each section measures is in bench/README.md. Timings are interleaved (A, B, A, B, ...) after a
warm-up and reported as medians, so every ratio compares steps taken under the same machine load.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# libgomp spins up to 300k rounds for a team's threads; on a shared machine a preempted team thread then stalls every
# op for a time slice (a SmolLM2 forward took 4-10 s instead of 1.2 s). A short spin keeps the fast hand-off. It must
# be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import sentiment  # noqa: E402  (bench/sentiment.py: the script's folder is first on sys.path)
import torch  # noqa: E402

from edgetune.optim import AdaFish, HiZOO, MeZO, ScaledAdamW  # noqa: E402
from edgetune.optim.hizoo import buffer_bytes  # noqa: E402
from edgetune.plan.sources import resolve_model  # noqa: E402
from edgetune.train.batching import batches, pad_token_id  # noqa: E402
from edgetune.train.data import DataConfig, load_dataset  # noqa: E402
from edgetune.train.loading import LoraSettings, load_model, load_tokenizer  # noqa: E402
from edgetune.train.memory import MemoryProbe  # noqa: E402

logger = logging.getLogger("bench.optimizers")
RESULTS = Path(__file__).resolve().parent / "results"
# The longest last: results are saved per section. "zo-speed" re-measures only the full-parameter zeroth-order steps
# of "speed" (the step-time goals) and keeps the stored LoRA and backprop timings.
SECTIONS = ("speed", "zo-speed", "memory", "zo", "convergence")
LORA16 = LoraSettings(rank=16, alpha=32.0)
BATCH, SEQ = 4, 128
ZO_EPS = 1e-3


def full_plan(quick: bool) -> dict[str, Any]:
    """Repetitions and step counts, sized for about 40 minutes at the reference speeds of bench/README.md."""
    lrs = (1e-4, 3e-4, 1e-3)
    return {
        "speed_reps": 2 if quick else 5,
        "lora_speed_reps": 2 if quick else 7,
        "conv_steps": 10 if quick else 100,
        "conv_eval_every": 5 if quick else 20,
        "conv_lrs": {"AdamW": lrs, "ScaledAdamW": lrs, "AdaFish": lrs},
        "zo": sentiment_plan(quick),
    }


def sentiment_plan(quick: bool) -> dict[str, Any]:
    """Zeroth-order sentiment runs: HiZOO steps, MeZO gets 1.5x as many (2 vs 3 forwards a step)."""
    hizoo_steps = 4 if quick else 30
    return {
        "n_train": 256,
        "n_val": 64 if quick else 256,
        "batch_size": 8,
        "eval_batch_size": 32,
        "hizoo_steps": hizoo_steps,
        "mezo_steps": hizoo_steps * 3 // 2,
        "lrs": {"MeZO": (1e-3, 3e-3, 1e-2), "HiZOO": (1e-3, 3e-3, 1e-2)},
        "eps": 1e-2,
        "hessian_smooth": 1e-3,
        "lora": {"rank": 8, "alpha": 16.0, "targets": ("q_proj", "v_proj")},
        "seed": 0,
    }


# --- shared helpers ---------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Run each function once to warm up, then ``reps`` rounds of all of them in turn; wall and CPU medians."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        k: {"median_s": statistics.median(wall[k]), "cpu_median_s": statistics.median(cpu[k]), "all_s": wall[k]}
        for k in fns
    }


def first_batch(tokenizer: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The benchmark batch (4 x 128 tokens of the bundled text) and the tokenized data."""
    data = load_dataset(DataConfig(seq_len=SEQ), tokenizer)
    return next(batches(data.train, BATCH, pad_token_id(tokenizer), shuffle=False)), data


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' 4-bit quantization states (absmax, nested absmax, code)."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, getattr(state, "code", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [v for s in optimizer.state.values() if isinstance(s, dict) for v in s.values()]
    return storage_bytes([t for t in tensors if isinstance(t, torch.Tensor)])


def reference_mezo_step(params: list[torch.Tensor], closure: Callable[[], torch.Tensor], lr: float, seed: int) -> float:
    """MeZO's step as princeton-nlp/MeZO@552cb1b large_models/trainer.py writes it (zo_step + zo_update).

    Global ``torch.manual_seed`` per perturbation, ``torch.normal`` in the parameter dtype, out-of-place updates for
    +1, -2, +1, and the update ``p.data = p.data - lr * (g * z + wd * p.data)``: four normal draws per step.
    """
    eps, wd = ZO_EPS, 0.0

    def perturb(scaling: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scaling * z * eps

    with torch.no_grad():
        perturb(1)
        loss1 = closure()
        perturb(-2)
        loss2 = closure()
        perturb(1)
        projected_grad = ((loss1 - loss2) / (2 * eps)).item()
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data - lr * (projected_grad * z + wd * p.data)
    return float(loss1)


# --- speed ------------------------------------------------------------------------------------------------------


def speed(source: Any, batch: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, Any]:
    """Zeroth-order steps against the reference and their forwards; backprop steps against torch AdamW."""
    return {
        "full_bf16": full_zo_speed(source, batch, plan),
        "lora_zo": lora_zo_speed(source, batch, plan),
        "backprop": backprop_speed(source, batch, plan),
    }


def full_zo_speed(source: Any, batch: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, Any]:
    """Reference-style MeZO, edgetune's MeZO and HiZOO over all parameters (``plan["zo_dtype"]``), and a forward pass.

    A CPU without native bf16 (AVX512-BF16 or AMX) runs bf16 forwards about 15x slower than one with it, which makes
    every step forward-bound; ``--zo-dtype fp32`` measures the same steps where the forward is not the anomaly.
    """
    model = load_model(source, plan.get("zo_dtype", "bf16")).eval()
    params, rng = trainable(model), random.Random(0)
    logger.info("speed: full-parameter bf16 steps (%d parameters)", sum(p.numel() for p in params))
    mezo, hizoo = MeZO(params, lr=1e-7, eps=ZO_EPS), HiZOO(params, lr=1e-7, eps=ZO_EPS, hessian_smooth=1e-8)

    def closure() -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def forward() -> None:
        closure()

    timed = interleaved(
        {
            "forward": forward,
            "reference_mezo_step": lambda: reference_mezo_step(params, closure, 1e-7, rng.randrange(10**9)),
            "mezo_step": lambda: mezo.step(closure),
            "hizoo_step": lambda: hizoo.step(closure),
        },
        plan["speed_reps"],
    )
    mezo.close()
    hizoo.close()
    directions = {"MeZO": mezo.perturbation, "HiZOO": hizoo.perturbation}
    count = sum(p.numel() for p in params)
    dtype = plan.get("zo_dtype", "bf16")
    return {
        "timings": timed,
        "trainable_params": count,
        "workers": mezo.workers,
        "directions": directions,
        "dtype": dtype,
    }


def lora_zo_speed(source: Any, batch: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, Any]:
    """MeZO and HiZOO steps on LoRA r=16 over NF4 against forward passes measured in the same rounds."""
    logger.info("speed: zeroth-order steps on LoRA r=16 over NF4")
    model = load_model(source, "nf4", lora=LORA16).eval()
    params = trainable(model)

    def closure() -> torch.Tensor:
        return model(**batch).loss

    mezo, hizoo = MeZO(params, lr=1e-7, eps=ZO_EPS), HiZOO(params, lr=1e-7, eps=ZO_EPS, hessian_smooth=1e-8)

    @torch.no_grad()
    def forward() -> None:
        closure()

    timed = interleaved(
        {"forward": forward, "mezo_step": lambda: mezo.step(closure), "hizoo_step": lambda: hizoo.step(closure)},
        plan["lora_speed_reps"],
    )
    mezo.close()
    hizoo.close()
    return {"timings": timed, "trainable_params": sum(p.numel() for p in params)}


def backprop_speed(source: Any, batch: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, Any]:
    """Whole training steps and optimizer.step() alone: ScaledAdamW and AdaFish against torch AdamW."""
    logger.info("speed: backprop steps on LoRA r=16 over NF4 with gradient checkpointing")
    model = load_model(source, "nf4", lora=LORA16, gradient_checkpointing=True)
    optimizers = {
        "AdamW": torch.optim.AdamW(trainable(model), lr=1e-5),
        "ScaledAdamW": ScaledAdamW.from_model(model, lr=1e-5),
        "AdaFish": AdaFish.from_model(model, lr=1e-5),
    }
    step_only: dict[str, list[float]] = {k: [] for k in optimizers}

    def whole_step(name: str) -> None:
        optimizer = optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_only[name].append(time.perf_counter() - start)

    timed = interleaved({k: (lambda k=k: whole_step(k)) for k in optimizers}, plan["speed_reps"])
    return {
        "timings": timed,
        "step_only": {k: {"median_s": statistics.median(v[1:]), "all_s": v[1:]} for k, v in step_only.items()},
    }


# --- convergence ------------------------------------------------------------------------------------------------


def convergence(source: Any, tokenizer: Any, data: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss every ``conv_eval_every`` steps per optimizer at three learning rates; same init and batches."""
    model = load_model(source, "nf4", lora=LORA16, gradient_checkpointing=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    pad = pad_token_id(tokenizer)
    held_out = list(batches(data.val, 8, pad, shuffle=False))
    builders = {
        "AdamW": lambda lr: torch.optim.AdamW(trainable(model), lr=lr),
        "ScaledAdamW": lambda lr: ScaledAdamW.from_model(model, lr=lr),
        "AdaFish": lambda lr: AdaFish.from_model(model, lr=lr),
    }
    runs: dict[str, dict[str, Any]] = {}
    for name, build in builders.items():
        for lr in plan["conv_lrs"][name]:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            began = time.time()
            curve = train_curve(model, build(lr), data.train, held_out, pad, plan)
            runs.setdefault(name, {})[f"{lr:g}"] = {"curve": curve, "seconds": time.time() - began}
            logger.info("convergence %s lr=%g: %s", name, lr, curve)
    return {"runs": runs, "steps": plan["conv_steps"], "held_out_blocks": len(data.val)}


def train_curve(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: list,
    held_out: list,
    pad: int,
    plan: dict[str, Any],
) -> list[dict[str, float]]:
    """Train for ``conv_steps`` on shuffled epochs (seed 0) and return the held-out loss at each evaluation."""
    curve, step, epoch = [], 0, 0
    while step < plan["conv_steps"]:
        for batch in batches(train, BATCH, pad, shuffle=True, seed=0, epoch=epoch):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
            step += 1
            if step % plan["conv_eval_every"] == 0:
                curve.append({"step": step, "loss": held_out_loss(model, held_out)})
            if step == plan["conv_steps"]:
                break
        epoch += 1
    optimizer.zero_grad(set_to_none=True)
    return curve


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, held_out: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over the validation blocks, in eval mode."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in held_out:
        count = int((batch["labels"][:, 1:] != -100).sum())
        total, tokens = total + float(model(**batch).loss) * count, tokens + count
    return total / tokens


def zeroth_order(source: Any, tokenizer: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """MeZO and HiZOO on Rotten Tomatoes sentiment at equal forward passes, three learning rates each."""
    settings = LoraSettings(
        rank=plan["lora"]["rank"], alpha=plan["lora"]["alpha"], target_modules=plan["lora"]["targets"]
    )
    model = load_model(source, "bf16", lora=settings).eval()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = sentiment.load_sentiment(tokenizer, plan["n_train"], plan["n_val"], seed=plan["seed"])
    ids, pad = sentiment.verbalizer_ids(tokenizer), pad_token_id(tokenizer)
    held_out = [
        sentiment.collate(data.val[i : i + plan["eval_batch_size"]], pad)
        for i in range(0, len(data.val), plan["eval_batch_size"])
    ]
    initial = sentiment.evaluate(model, held_out, ids)
    logger.info("zeroth-order start: %s", initial)
    runs: dict[str, dict[str, Any]] = {}
    for name, steps in (("MeZO", plan["mezo_steps"]), ("HiZOO", plan["hizoo_steps"])):
        for lr in plan["lrs"][name]:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            kwargs = dict(lr=lr, eps=plan["eps"], seed=plan["seed"])
            if name == "HiZOO":
                kwargs["hessian_smooth"] = plan["hessian_smooth"]
            optimizer = (MeZO if name == "MeZO" else HiZOO)(trainable(model), **kwargs)
            run = sentiment.zo_run(model, optimizer, data, held_out, {**plan, "steps": steps}, ids, pad)
            runs.setdefault(name, {})[f"{lr:g}"] = run
            logger.info("zeroth-order %s lr=%g: %s", name, lr, run["curve"])
    return {
        "runs": runs,
        "initial": initial,
        "majority_accuracy": data.majority_accuracy,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "trainable_params": sum(p.numel() for p in trainable(model)),
    }


# --- memory -----------------------------------------------------------------------------------------------------


def memory(source: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Peak of one training step (after a warm-up step) plus resident weights and optimizer state, per strategy."""
    rows = backprop_memory(load_model(source, "nf4", lora=LORA16, gradient_checkpointing=True), batch)
    rows.update(zo_memory(load_model(source, "nf4", lora=LORA16).eval(), batch, "LoRA r=16, NF4"))
    rows.update(zo_memory(load_model(source, "bf16").eval(), batch, "all parameters, bf16"))
    return {"rows": rows, "batch": f"{BATCH} x {SEQ} tokens"}


def backprop_memory(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    rows = {}
    builders = {
        "AdamW": lambda: torch.optim.AdamW(trainable(model), lr=1e-5),
        "ScaledAdamW": lambda: ScaledAdamW.from_model(model, lr=1e-5),
        "AdaFish": lambda: AdaFish.from_model(model, lr=1e-5),
    }
    for name, build in builders.items():
        optimizer = build()

        def step(optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()

        rows[f"{name} (LoRA r=16, NF4, checkpointing)"] = probe_step(step, model, optimizer, 0)
        optimizer.zero_grad(set_to_none=True)
    return rows


def zo_memory(model: torch.nn.Module, batch: dict[str, torch.Tensor], label: str) -> dict[str, Any]:
    rows = {}
    params = trainable(model)
    largest = max(p.numel() for p in params)
    for name, optimizer in (("MeZO", MeZO(params, lr=1e-7)), ("HiZOO", HiZOO(params, lr=1e-7))):
        work = buffer_bytes(largest, optimizer.hessian, optimizer.chunk_numel, optimizer.workers)
        rows[f"{name} ({label})"] = probe_step(
            lambda o=optimizer: o.step(lambda: model(**batch).loss), model, optimizer, work
        )
        optimizer.close()
    return rows


def probe_step(
    step: Callable[[], Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, work_bytes: int
) -> dict[str, int]:
    """Warm up (optimizer state and work buffers appear), then probe one step; resident + step peak = total."""
    step()
    with MemoryProbe("cpu") as probe:
        step()
    weights, state = storage_bytes(weight_tensors(model)), optimizer_state_bytes(optimizer)
    resident = weights + state + work_bytes
    report = probe.report
    return {
        "weights_bytes": weights,
        "trainable_bytes": storage_bytes(trainable(model)),
        "optimizer_state_bytes": state,
        "work_buffer_bytes": work_bytes,
        "resident_bytes": resident,
        "step_peak_bytes": report.peak_allocated_bytes,
        "total_bytes": resident + report.peak_allocated_bytes,
        "peak_rss_bytes": report.peak_rss_bytes,
    }


# --- goals and report -------------------------------------------------------------------------------------------


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of the issue that this run measured: the value, the limit and whether it was met."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, value: float | None, limit: float, met: bool | None, note: str = "") -> None:
        rows.append({"goal": goal, "value": value, "limit": limit, "met": met, "note": note})

    speed_res = results.get("speed")
    if speed_res:
        full = {k: v["median_s"] for k, v in speed_res["full_bf16"]["timings"].items()}
        ref, fwd = full["reference_mezo_step"], full["forward"]
        for name, limit, forwards in (("MeZO", 0.35, 2), ("HiZOO", 0.5, 3)):
            ratio = full[f"{name.lower()}_step"] / ref
            floor = f"(its {forwards} forwards alone: {forwards * fwd / ref:.2f}; reference = {ref / fwd:.1f} forwards)"
            dtype = speed_res["full_bf16"].get("dtype", "bf16")
            add(f"{name} step / reference step (all {dtype} params)", ratio, limit, ratio <= limit, floor)
        lora = {k: v["median_s"] for k, v in speed_res["lora_zo"]["timings"].items()}
        for name, forwards in (("mezo_step", 2), ("hizoo_step", 3)):
            ratio = lora[name] / (forwards * lora["forward"])
            add(f"LoRA-only {name.split('_')[0]} step / its {forwards} forward passes", ratio, 1.1, ratio <= 1.1)
        whole = {k: v["median_s"] for k, v in speed_res["backprop"]["timings"].items()}
        for name, limit in (("ScaledAdamW", 1.05), ("AdaFish", 1.15)):
            ratio = whole[name] / whole["AdamW"]
            add(f"{name} whole step / AdamW whole step", ratio, limit, ratio <= limit)
    if results.get("convergence"):
        rows += convergence_goals(results["convergence"])
    if results.get("zo"):
        best = {n: min(r["curve"][-1]["loss"] for r in runs.values()) for n, runs in results["zo"]["runs"].items()}
        add(
            "HiZOO best held-out loss - MeZO best, equal forwards",
            best["HiZOO"] - best["MeZO"],
            0.0,
            best["HiZOO"] <= best["MeZO"],
        )
    return rows


def convergence_goals(conv: dict[str, Any]) -> list[dict[str, Any]]:
    final = {n: {lr: r["curve"][-1]["loss"] for lr, r in runs.items()} for n, runs in conv["runs"].items()}
    best = {n: min(v.values()) for n, v in final.items()}
    spread = {n: max(v.values()) - min(v.values()) for n, v in final.items()}
    rows = [
        {
            "goal": "ScaledAdamW best loss - AdamW best loss",
            "value": best["ScaledAdamW"] - best["AdamW"],
            "limit": 0.0,
            "met": best["ScaledAdamW"] <= best["AdamW"],
            "note": "",
        },
        {
            "goal": "ScaledAdamW spread across lrs - AdamW spread",
            "value": spread["ScaledAdamW"] - spread["AdamW"],
            "limit": 0.0,
            "met": spread["ScaledAdamW"] < spread["AdamW"],
            "note": "",
        },
    ]
    fish_lr = min(final["AdaFish"], key=final["AdaFish"].get)
    reached = [pt["step"] for pt in conv["runs"]["AdaFish"][fish_lr]["curve"] if pt["loss"] <= best["AdamW"]]
    first = reached[0] if reached else None
    limit = 0.6 * conv["steps"]
    any_lr = [pt["step"] for r in conv["runs"]["AdaFish"].values() for pt in r["curve"] if pt["loss"] <= best["AdamW"]]
    note = "" if reached else f"not reached within {conv['steps']} steps"
    note += f"; earliest at any lr: step {min(any_lr)}" if any_lr else ""
    rows.append(
        {
            "goal": f"AdaFish (lr {fish_lr}) steps to AdamW's best {conv['steps']}-step loss",
            "value": first,
            "limit": limit,
            "met": first is not None and first <= limit,
            "note": note,
        }
    )
    return rows


def render(results: dict[str, Any]) -> str:
    """The markdown report: setup, goals, then a table per section."""
    meta = results["meta"]
    lines = [
        "# Optimizer benchmark (SmolLM2-135M)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}  ",
        f"torch {meta['torch']}, {meta['threads']} intra-op threads, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}, GOMP_SPINCOUNT={meta.get('gomp_spincount')}, "
        f"load average at start {meta['load_start']}  ",
        "",
    ]
    lines += ["## Goals", "", "| goal | measured | limit | met |", "|---|---|---|---|"]
    for g in results["goals"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.3g}"
        met = {True: "met", False: "**not met**", None: "n/a"}[g["met"]]
        lines.append(f"| {g['goal']} | {value} {g['note']} | {g['limit']:g} | {met} |")
    if results.get("speed"):
        lines += speed_tables(results["speed"])
    if results.get("convergence"):
        conv = results["convergence"]
        lines += [
            "",
            f"## Convergence (backprop): held-out loss, LoRA r=16 over NF4 + checkpointing, batch {BATCH} x "
            f"{SEQ}, {conv['held_out_blocks']} held-out blocks",
            "",
        ]
        steps = [pt["step"] for pt in next(iter(next(iter(conv["runs"].values())).values()))["curve"]]
        lines += [
            "| optimizer | lr | " + " | ".join(f"step {s}" for s in steps) + " | seconds |",
            "|---|---|" + "---|" * (len(steps) + 1),
        ]
        for name, runs in conv["runs"].items():
            for lr, run in runs.items():
                cells = " | ".join(f"{pt['loss']:.4f}" for pt in run["curve"])
                lines.append(f"| {name} | {lr} | {cells} | {run['seconds']:.0f} |")
    if results.get("zo"):
        lines += zo_table(results["zo"])
    if results.get("memory"):
        mem = results["memory"]
        lines += [
            "",
            f"## Peak memory of one training step (CPU, batch {mem['batch']}), MiB",
            "",
            "| strategy | weights | optimizer state | work buffers | resident | step peak | total | peak RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        for name, r in mem["rows"].items():
            lines.append(
                f"| {name} | {mib(r['weights_bytes'])} | {mib(r['optimizer_state_bytes'])} | "
                f"{mib(r['work_buffer_bytes'])} | {mib(r['resident_bytes'])} | {mib(r['step_peak_bytes'])} | "
                f"{mib(r['total_bytes'])} | {mib(r['peak_rss_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def speed_tables(speed_res: dict[str, Any]) -> list[str]:
    full, lora, back = speed_res["full_bf16"], speed_res["lora_zo"], speed_res["backprop"]
    fwd = full["timings"]["forward"]["median_s"]
    lines = [
        "",
        f"## Speed: zeroth-order steps over all {full['trainable_params']:,} {full.get('dtype', 'bf16')} parameters, "
        f"batch {BATCH} x "
        f"{SEQ} ({full['workers']} workers; directions: "
        + ", ".join(f"{k} {v}" for k, v in full.get("directions", {"MeZO": "gaussian", "HiZOO": "gaussian"}).items())
        + ")",
        "",
        "| step | median s | CPU s | x reference | x forward |",
        "|---|---|---|---|---|",
    ]
    ref = full["timings"]["reference_mezo_step"]["median_s"]
    for name, t in full["timings"].items():
        lines.append(
            f"| {name} | {t['median_s']:.3f} | {t['cpu_median_s']:.3f} | {t['median_s'] / ref:.3f} | "
            f"{t['median_s'] / fwd:.2f} |"
        )
    lfwd = lora["timings"]["forward"]["median_s"]
    lines += [
        "",
        f"## Speed: zeroth-order steps on LoRA r=16 over NF4 ({lora['trainable_params']:,} parameters)",
        "",
        "| step | median s | CPU s | x its forward passes |",
        "|---|---|---|---|",
    ]
    for name, t in lora["timings"].items():
        forwards = {"forward": 1, "mezo_step": 2, "hizoo_step": 3}[name]
        lines.append(
            f"| {name} | {t['median_s']:.3f} | {t['cpu_median_s']:.3f} | {t['median_s'] / (forwards * lfwd):.3f} |"
        )
    adamw, adamw_step = back["timings"]["AdamW"]["median_s"], back["step_only"]["AdamW"]["median_s"]
    lines += [
        "",
        "## Speed: backprop steps, LoRA r=16 over NF4 with gradient checkpointing",
        "",
        "| optimizer | whole step s | x AdamW | optimizer.step() s | x AdamW's |",
        "|---|---|---|---|---|",
    ]
    for name, t in back["timings"].items():
        step_s = back["step_only"][name]["median_s"]
        lines.append(
            f"| {name} | {t['median_s']:.3f} | {t['median_s'] / adamw:.3f} | {step_s:.4f} | {step_s / adamw_step:.2f} |"
        )
    return lines


def zo_table(zo: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Convergence (zeroth-order): Rotten Tomatoes sentiment, LoRA r=8 on q/v over bf16, "
        f"{zo['n_train']} train / {zo['n_val']} held-out, majority-class accuracy {zo['majority_accuracy']:.3f}",
        "",
        "| optimizer | lr | forwards | held-out loss | accuracy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    init = zo["initial"]
    lines.append(f"| (start) | | 0 | {init['loss']:.4f} | {init['accuracy']:.3f} | |")
    for name, runs in zo["runs"].items():
        for lr, run in runs.items():
            for pt in run["curve"]:
                lines.append(
                    f"| {name} | {lr} | {pt['forwards']} | {pt['loss']:.4f} | {pt['accuracy']:.3f} | "
                    f"{run['seconds']:.0f} |"
                )
    return lines


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({model or platform.processor()})"


def main() -> None:
    """Run the chosen sections and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test of a few minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--zo-dtype", default="bf16", choices=("bf16", "fp32"), help="full-parameter ZO speed dtype")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {set(sections) - set(SECTIONS)}; use {SECTIONS}")
    plan = {**full_plan(args.quick), "zo_dtype": args.zo_dtype}
    json_path = RESULTS / ("optimizers_quick.json" if args.quick else "optimizers.json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results["meta"] = {
        "command": " ".join([".venv/bin/python", "bench/optimizers.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset"),
        "load_start": os.getloadavg(),
        "plan": plan,
    }
    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source)
    batch, data = first_batch(tokenizer)
    steps = {
        "speed": lambda: speed(source, batch, plan),
        "zo-speed": lambda: {**results.get("speed", {}), "full_bf16": full_zo_speed(source, batch, plan)},
        "convergence": lambda: convergence(source, tokenizer, data, plan),
        "zo": lambda: zeroth_order(source, tokenizer, plan["zo"]),
        "memory": lambda: memory(source, batch),
    }
    for name in sections:
        began, load, key = time.time(), os.getloadavg(), "speed" if name == "zo-speed" else name
        results[key] = steps[name]()
        results[key]["section_seconds"] = time.time() - began
        results[key]["load_average"] = {"start": load, "end": os.getloadavg()}
        logger.info("%s done in %.0f s", name, time.time() - began)
        results["goals"] = goals(results)
        logger.info("goals so far: %s", [(g["goal"], g["value"], g["met"]) for g in results["goals"]])
        RESULTS.mkdir(parents=True, exist_ok=True)  # written after every section: a long run keeps what it measured
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        json_path.with_suffix(".md").write_text(render(results))
    logger.info("wrote %s and %s", json_path, json_path.with_suffix(".md"))


if __name__ == "__main__":
    main()
