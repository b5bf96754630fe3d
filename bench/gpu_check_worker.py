"""One job of bench/gpu_check.py, in a fresh process: build the random-weight models, or measure one case.

    python bench/gpu_check_worker.py JOB.job.json    # writes JOB.result.json; started by bench/gpu_check.py

A fresh process per case starts from an empty CUDA allocator, so its peaks belong to that case alone, and an OOM
or a crash ends only that case. Every failure becomes a result (``status`` oom or error, and the first line of the
message), so the parent's table shows why a row has no figures.
"""

import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(job_file: Path) -> int:
    job = json.loads(job_file.read_text())
    try:
        outcome = build_models(job) if job["kind"] == "build" else measure(job)
    except Exception as exc:  # noqa: BLE001 - any failure, an OOM above all, becomes this case's row
        traceback.print_exc()
        message = (str(exc).strip().splitlines() or [""])[0][:300]
        status = "oom" if "out of memory" in str(exc).lower() else "error"
        outcome = {"status": status, "error": f"{type(exc).__name__}: {message}"}
    Path(job_file.as_posix().removesuffix(".job.json") + ".result.json").write_text(json.dumps(outcome))
    return 0


def build_models(job: dict) -> dict:
    """Random bf16 weights made on the device itself (seconds for 1B on a GPU), saved beside the config and tokenizer.

    The parent wrote each folder's config.json, so it could plan before the weights exist.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    for folder in job["folders"]:
        torch.manual_seed(0)
        with torch.device(job["device"]):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
    return {"status": "ok"}


def measure(job: dict) -> dict:
    """Real training steps of one strategy and shape (``api.probe``), reduced to the figures gpu_check compares."""
    from edgetune import api
    from edgetune.train.probe import ProbeConfig

    config = ProbeConfig(
        model=job["model_path"],
        strategy=job["strategy"],
        lora_rank=job["lora_rank"],
        lora_alpha=2.0 * job["lora_rank"],
        batch_size=job["batch_size"],
        seq_len=job["seq_len"],
        steps=job["steps"],
        data=job["data"],
        device=job["device"],
    )
    result = api.probe(config, on_event=lambda message: print(message, flush=True))
    on_cuda = job["device"] == "cuda"
    measured = result.steps[1:] or result.steps  # the first step also creates the optimizer state and picks kernels
    reports = [step.memory for step in measured]
    nvml = [r.nvml_used_bytes for r in reports if r.nvml_used_bytes is not None]
    return {
        "status": "ok",
        "cuda_max_allocated_bytes": max(r.baseline_allocated_bytes + r.peak_allocated_bytes for r in reports)
        if on_cuda
        else None,
        "cuda_max_reserved_bytes": max(r.peak_reserved_bytes for r in reports) if on_cuda else None,
        "nvml_used_bytes": max(nvml) if nvml else None,
        # The CPU probe sees only tensors made inside the step; weights, adapters and state were made before it.
        "tensor_peak_bytes": None if on_cuda else result.resident_bytes + max(r.peak_allocated_bytes for r in reports),
        "peak_rss_bytes": max(r.peak_rss_bytes for r in reports),
        "resident_bytes": result.resident_bytes,
        "tokens_per_s": round(sum(s.tokens for s in measured) / sum(s.seconds for s in measured), 1),
        "step_seconds": [round(s.seconds, 3) for s in result.steps],
        "losses": [round(s.loss, 4) for s in result.steps],
        "load_seconds": round(result.load_seconds, 1),
    }


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
