"""What bench/gpu_check.py sets side by side: each case's measured memory against its plan, and QLoRA against LoRA.

Memory is in bytes in the JSON and in MiB in the markdown table.
"""

QLORA, LORA_BASES = "scaled-adamw-qlora-gc", ("adamw-lora-gc", "adafish-lora-gc")
MEASURED_PEAK = {
    False: "CUDA max_memory_allocated",
    True: "tracked tensor peak (resident tensors + the step's new ones)",
}
MEASURED_TOTAL = {False: "NVML used memory less what was in use before the run", True: "peak RSS of the process"}


def compared(row: dict, idle_bytes: int | None) -> dict:
    """Measured peak and total beside the plan; error = (planned - measured) / measured, so > 0 is safe."""
    if row.get("status") != "ok":
        return {}
    on_cuda = row["cuda_max_allocated_bytes"] is not None
    reserved = row["cuda_max_reserved_bytes"]
    peak = row["cuda_max_allocated_bytes"] if on_cuda else row["tensor_peak_bytes"]
    total = row["peak_rss_bytes"]
    if on_cuda:
        used = row["nvml_used_bytes"]
        total = None if used is None else used - (idle_bytes or 0)
    return {
        "measured_peak_bytes": peak,
        "measured_total_bytes": total,
        "peak_error_pct": _error_pct(row["planned_peak_bytes"], peak),
        "total_error_pct": _error_pct(row["planned_total_bytes"], total),
        # The slack stands for what the caching allocator holds beyond the allocated peak.
        "reserved_error_pct": _error_pct(row["planned_peak_bytes"] + row["planned_slack_bytes"], reserved),
    }


def _error_pct(planned_bytes: int, measured_bytes: int | None) -> float | None:
    # + 0.0 turns round's -0.0 into 0.0, so a table never shows "-0.0%".
    return None if not measured_bytes else round(100 * (planned_bytes - measured_bytes) / measured_bytes, 1) + 0.0


def ratios(rows: list[dict]) -> list[dict]:
    """QLoRA's peak over a bf16 LoRA strategy's at the same model and shape: what the 4-bit base saves."""
    by_case = {(r["model"], r["batch_size"], r["seq_len"], r["strategy"]): r for r in rows}
    found = []
    for (model, batch_size, seq_len, strategy), lora in by_case.items():
        qlora = by_case.get((model, batch_size, seq_len, QLORA))
        if strategy not in LORA_BASES or qlora is None:
            continue
        measured = (qlora.get("measured_peak_bytes"), lora.get("measured_peak_bytes"))
        found.append(
            {"model": model, "batch_size": batch_size, "seq_len": seq_len, "lora": strategy}
            | {"planned": round(qlora["planned_peak_bytes"] / lora["planned_peak_bytes"], 3)}
            | {"measured": round(measured[0] / measured[1], 3) if all(measured) else None}
        )
    return found


def render(results: dict) -> str:
    """gpu.md: how it was run, one row per case, then the QLoRA/LoRA ratios."""
    meta_ = results["meta"]
    setup = f"{meta_['device']}, torch {meta_['torch']}; LoRA r={meta_['lora_rank']}"
    lines = [
        "# Planned vs measured memory" + (" (dry run on the CPU, tiny models)" if meta_["dry_run"] else ""),
        "",
        f"`{meta_['command']}` on {meta_['date']}; {setup}, {meta_['steps']} step(s) per case (the first left out "
        f"when there are more); {meta_['elapsed_s']:.0f} s.",
        "",
        f"Measured peak: {meta_['measured_peak']}. Measured total: {meta_['measured_total']}. Max reserved: CUDA "
        "max_memory_reserved, set against the planned peak plus allocator slack. Error = (planned - measured) / "
        "measured, so above 0 the planner over-estimates (the safe side). Memory in MiB.",
        "",
        "| model | shape | strategy | planned peak | measured peak | error | planned total | measured total | error "
        "| max reserved | error | tokens/s | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"[:100].replace("|", "/")
        cells = [r["model"], f"{r['batch_size']} x {r['seq_len']}", r["strategy"], _mib(r["planned_peak_bytes"])]
        cells += [_mib(r.get("measured_peak_bytes")), _pct(r.get("peak_error_pct")), _mib(r["planned_total_bytes"])]
        cells += [_mib(r.get("measured_total_bytes")), _pct(r.get("total_error_pct"))]
        cells += [_mib(r.get("cuda_max_reserved_bytes")), _pct(r.get("reserved_error_pct"))]
        cells += [_number(r.get("tokens_per_s")), status]
        lines.append("| " + " | ".join(cells) + " |")
    if results["ratios"]:
        lines += ["", f"## {QLORA} peak over a LoRA strategy's (bf16 base)", ""]
        lines += ["| model | shape | LoRA strategy | planned | measured |", "|---|---|---|---:|---:|"]
        for q in results["ratios"]:
            shape = f"{q['batch_size']} x {q['seq_len']}"
            lines.append(f"| {q['model']} | {shape} | {q['lora']} | {q['planned']:.2f} | {_number(q['measured'])} |")
    return "\n".join(lines) + "\n"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}" if value < 10 else f"{value:,.0f}"
