"""What the CLI shows a person: the live training line and the summaries printed when a command ends."""

import sys
from typing import TextIO


class TrainProgress:
    """Training progress on stderr: a tqdm bar on a terminal, one plain line every few steps elsewhere.

    A log file, CI or ``nohup`` gets whole lines (step, loss, tokens/s, ETA, memory) instead of one line rewritten
    with carriage returns; ETAs past an hour show hours.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None
        self.interactive = self.stream.isatty()

    def update(self, info) -> None:
        memory = info.memory.get("reserved_bytes", info.memory.get("rss_bytes", 0)) / 2**20
        fields = f"loss {info.loss:.4f}  {info.tokens_per_second:,.0f} tok/s  mem {memory:,.0f} MiB"
        if info.val_loss is not None:
            fields += f"  val {info.val_loss:.4f}"
        if self.interactive:
            self._bar(info).set_postfix_str(fields, refresh=False)
            self.bar.update(info.step - self.bar.n)
        elif info.step % _plain_every(info.total_steps) == 0 or info.step == info.total_steps:
            eta = _duration(info.eta_seconds)
            print(f"step {info.step}/{info.total_steps}  {fields}  ETA {eta}", file=self.stream, flush=True)

    def _bar(self, info):
        if self.bar is None:
            from tqdm import tqdm

            start = info.step - 1  # a resumed run starts part-way
            self.bar = tqdm(total=info.total_steps, initial=start, file=self.stream, unit="step", dynamic_ncols=True)
        return self.bar

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _plain_every(total_steps: int) -> int:
    """Steps between plain progress lines: about 20 lines a run, at most one every 50 steps."""
    return max(1, min(50, round(total_steps / 20)))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def train_summary(result) -> str:
    from edgetune.train.run_folder import TOTAL_FIGURES

    ratios = result.memory_ratios()
    total_name = TOTAL_FIGURES.get(result.measured_total_figure, result.measured_total_figure)
    return "\n".join(
        [
            f"{result.status}: {result.steps_done} steps of {result.strategy} ({result.strategy_reason})",
            f"held-out loss {result.val_loss_before:.4f} before, {result.val_loss_after:.4f} after",
            _versus("tensors", result.planned_peak_bytes, "tracked", result.measured_peak_bytes, ratios),
            _versus("total", result.planned_total_bytes, total_name, result.measured_total_bytes, ratios),
            f"outputs: {result.output_dir}"
            + (" (load with PeftModel.from_pretrained)" if "adapter" in str(result.output_dir) else ""),
            f"log, checkpoints and memory report (summary.json, memory.png): {result.run_dir}",
            *_samples(result.samples_before, result.samples_after),
        ]
    )


def _samples(before, after) -> list[str]:
    """eval.prompts answered before and after training, one line each (newlines shown as spaces)."""
    if not after:
        return []
    lines = ["answers to eval.prompts (greedy):"]
    earlier = {s["prompt"]: s["answer"] for s in before or []}
    for sample in after:
        lines.append(f"  prompt: {_one_line(sample['prompt'])}")
        if sample["prompt"] in earlier:
            lines.append(f"    before: {_one_line(earlier[sample['prompt']])}")
        lines.append(f"    after:  {_one_line(sample['answer'])}")
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _versus(what: str, planned_bytes: int, name: str, measured_bytes: int, ratios: dict) -> str:
    """One line of plan against measurement: ``peak memory, tensors: planned 1,138 MiB, tracked 1,130 MiB (0.99x)``."""
    ratio = ratios[f"measured_over_planned_{what}"]
    mib = 2**20
    shown = f" ({ratio:.2f}x)" if ratio is not None else ""
    return f"peak memory, {what}: planned {planned_bytes / mib:,.0f} MiB, {name} {measured_bytes / mib:,.0f} MiB{shown}"


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
        lines.append(f"  {onnx.cached_logits.describe()}")
        lines.append(
            f"  greedy {len(onnx.greedy_torch)} tokens with the KV cache identical to torch's generate "
            f"({onnx.onnx_seconds_per_token * 1000:.0f} ms/token in onnxruntime)"
        )
        if onnx.int8 is not None:
            int8 = onnx.int8
            lines.append(
                f"int8 ONNX model: {int8.path} ({int8.size_bytes / 2**20:,.0f} MiB, {int8.int8_matmuls} MatMuls int8, "
                f"{int8.float_matmuls} kept float32)"
            )
            lines.append(f"  {int8.describe()}")
    if result.gguf is not None:
        gguf = result.gguf
        types = ", ".join(f"{count} {kind}" for kind, count in gguf.tensor_types.items())
        lines.append(
            f"GGUF {gguf.gguf_type}: {gguf.path} ({gguf.size_bytes / 2**20:,.0f} MiB, tensors {types}, "
            f"{gguf.seconds:.0f} s)"
        )
        lines += [f"  {check.describe()}" for check in gguf.checks]
        same = "encodes" if gguf.tokenizer_identical else "does NOT encode"
        lines.append(f"  the tokenizer transformers reads from the GGUF {same} the sample prompts like the run's")
        lines.append(
            f"  Ollama: cd {gguf.modelfile.parent} && ollama create NAME -f {gguf.modelfile.name} && ollama run NAME"
        )
        lines.append(f"  llama.cpp: llama-cli -m {gguf.path} -cnv")
    return "\n".join(lines)
