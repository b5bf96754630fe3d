"""What the CLI shows a person: the live training line and the summaries printed when a command ends."""

import sys
import time


class TrainProgress:
    """One updating line on stderr: step/total, loss, tokens/s, ETA and memory."""

    def __init__(self) -> None:
        self.active = False

    def update(self, info) -> None:
        memory = info.memory.get("reserved_bytes", info.memory.get("rss_bytes", 0)) / 2**20
        eta = time.strftime("%M:%S", time.gmtime(info.eta_seconds)) if info.eta_seconds < 3600 else ">1h"
        bar = "#" * int(20 * info.step / info.total_steps)
        line = (
            f"\r[{bar:<20}] step {info.step}/{info.total_steps}  loss {info.loss:.4f}  "
            f"{info.tokens_per_second:,.0f} tok/s  ETA {eta}  mem {memory:,.0f} MiB"
        )
        if info.val_loss is not None:
            line += f"  val {info.val_loss:.4f}"
        print(line, end="", file=sys.stderr, flush=True)
        self.active = True

    def message(self, text: str) -> None:
        self.close()
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.active:
            print(file=sys.stderr)
            self.active = False


def train_summary(result) -> str:
    mib = 2**20
    return "\n".join(
        [
            f"{result.status}: {result.steps_done} steps of {result.strategy} ({result.strategy_reason})",
            f"held-out loss {result.val_loss_before:.4f} before, {result.val_loss_after:.4f} after",
            f"peak memory: planned {result.planned_peak_bytes / mib:,.0f} MiB, "
            f"measured {result.measured_peak_bytes / mib:,.0f} MiB (tensors)",
            f"outputs: {result.output_dir}"
            + (" (load with PeftModel.from_pretrained)" if "adapter" in str(result.output_dir) else ""),
            f"log, checkpoints and memory report (summary.json, memory.png): {result.run_dir}",
        ]
    )


def export_summary(result) -> str:
    lines = []
    if result.merged is not None:
        merged = result.merged
        lines.append(
            f"merged {merged.dtype} model: {merged.out_dir} ({merged.size_bytes / 2**20:,.0f} MiB, "
            f"{merged.seconds:.0f} s)"
        )
        lines += [f"  {check.describe()}" for check in merged.checks]
    if result.onnx is not None:
        onnx = result.onnx
        data = f" + {onnx.path.name}.data" if onnx.external_data else ""
        lines.append(
            f"ONNX model: {onnx.path}{data} ({onnx.size_bytes / 2**20:,.0f} MiB, opset {onnx.opset}, "
            f"exported in {onnx.export_seconds:.0f} s)"
        )
        lines.append(f"  {onnx.logits.describe()}")
        lines.append(
            f"  greedy {len(onnx.greedy_torch)} tokens identical in torch and onnxruntime "
            f"({onnx.onnx_seconds_per_token * 1000:.0f} ms/token in onnxruntime, no KV cache)"
        )
    return "\n".join(lines)
