"""Measured constants of the memory planner, with the command that measures each one again.

Everything else the planner uses is exact (parameter counts, quantized weight layout, optimizer state). These
numbers describe what autograd and the loss keep alive, which depends on the transformers/torch/peft stack;
they were measured with transformers 5.23, torch 2.13 and peft 0.21 on CPU.
"""

# Bytes saved for backward per token per decoder layer (Llama-style block: RMSNorm, GQA attention through SDPA,
# SwiGLU MLP), as a linear combination of the block's widths. Fitted exactly from saved-tensor hooks on 1- and
# 2-layer models of 5 shapes x 3 LoRA target sets x 2 ranks: `python bench/planner_calibrate.py`. The LoRA fit
# leaves at most 109 bytes per token per layer unexplained (under 0.5% for any model above 4M parameters).
# "adapted_inputs" is the sum of the input widths of the adapted linears: peft casts each adapter's input to
# the fp32 adapter dtype and keeps that copy for the adapter's weight gradient.
ACTIVATION_COEFFICIENTS: dict[str, dict[str, float]] = {
    "lora": {
        "hidden": 11.974,
        "kv_dim": 3.981,
        "intermediate": 6.106,
        "heads": 2.819,
        "adapted_inputs": 3.994,
        "adapted_rank": 3.888,
    },
    "full": {
        "hidden": 19.993,
        "kv_dim": 3.987,
        "intermediate": 8.009,
        "heads": 5.075,
        "adapted_inputs": 0.0,
        "adapted_rank": 0.0,
    },
}
# With gradient checkpointing each layer keeps only its bf16 input (2 bytes per hidden unit per token); the same
# script measures exactly 2.000 for every mode.
CHECKPOINT_BYTES_PER_HIDDEN = 2

# Bytes per token per vocabulary entry that the logits and the cross-entropy hold at their peak: bf16 logits, the
# fp32 upcast transformers' loss makes, fp32 log-probabilities and, with backprop, the gradient. Measured as the
# step peak of the tiny model (2 layers, vocabulary 49,152, so the logits dominate) at 128 and 512 tokens:
# `python bench/planner_measure.py --quick` gives 12.3 with backprop and 10.0 forward-only.
LOGITS_BYTES_BACKPROP = 12.3
LOGITS_BYTES_FORWARD = 10.0
# The same for the published measurements of Hugging Face stacks (transformers before 4.45, 2023-2024: the model's
# forward returned fp32 logits and the loss made a shifted fp32 copy: fp32 logits, the copy, the log-probabilities
# and the gradient). 16 replays Unsloth's HF + FA2 column within 10% where 12.3 falls 9-22% short
# (`python bench/planner_accuracy.py`); today's transformers measures 12.3, so `--stack hf` errs on the safe side.
HF_LOGITS_BYTES_BACKPROP = 16.0

# edgetune's own loss never holds all logits: the head and the cross-entropy run over chunks of about this many
# logits (16 MiB in fp32), which keeps a chunk's matmul large enough to run at full speed (bench/loss.py).
LOSS_CHUNK_LOGITS = 2**22
# Bytes per logit of one chunk at the chunked loss's peak, by (bytes per head weight, pass). A 16-bit head: the
# 16-bit logits and their fp32 copy, then the fp32 probabilities and their 16-bit gradient (6); a trained head adds
# the fp32 copy its gradient is accumulated from (10). An fp32 head needs no copies (4). Measured as whole-step
# peaks of a 2-layer model with SmolLM2's 49,152-entry vocabulary (4 x 64 tokens, chunks of 85 positions, every
# strategy; the planner then lands within 6% of each step, tests/plan/test_components.py) and on the loss alone
# (8,000 entries, 600 positions, chunks of 16-256): `python bench/loss.py --sections memory`.
CHUNK_LOGIT_BYTES: dict[tuple[int, str], float] = {
    (2, "forward"): 6.0,
    (2, "frozen head"): 6.0,
    (2, "trained head"): 10.0,
    (4, "forward"): 4.0,
    (4, "frozen head"): 4.0,
    (4, "trained head"): 4.0,
}

# torch's AdamW runs per tensor on CPU (foreach off), so its step allocates about two copies of the largest
# trainable tensor; on CUDA foreach is on and the step allocates one copy of all state (sqrt of exp_avg_sq).
# Measured on SmolLM2-135M full fine-tuning (bench/planner_measure.py): the step peak equals bf16 gradients
# plus two copies of the tied embedding.
ADAMW_CPU_TEMPORARY_COPIES = 2

# CUDA context plus cuBLAS workspaces when the device has not been measured (planner-model.md 6.7: PyTorch
# reports 287-667 MB; 600 MB is the documented middle). Profiles may carry a measured ctx_overhead_bytes.
DEFAULT_CUDA_CONTEXT_BYTES = 600 * 1024**2

# Saved activations of other tools' decoder blocks relative to the block ACTIVATION_COEFFICIENTS measures, for the
# stacks whose kernels differ (edgetune.plan.stacks), fitted so that the tool's published peaks replay with a
# median error near zero: `python bench/planner_accuracy.py --fit` prints the median error over a grid of scales.
# Unsloth (offloaded checkpoints, so one recomputed layer is on the device): 1.4 gives +0.3% over its 7 rows; its
# peaks need more than one layer of transformers' block, for a reason not measured here. litgpt: the median is
# flat (-1.8%) from 0.75 to 1.25 because its rows split (Llama-2 9-17% under, phi-1.5 and StableLM 13-27% over:
# its own attention and MLP code differs from transformers' per family), so no scale is applied.
ACTIVATION_SCALE: dict[str, float] = {"unsloth": 1.4, "litgpt": 1.0}
