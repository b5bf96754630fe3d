"""Published peak-memory measurements (../shared/reference/planner-model.md section 2), as `edgetune plan` options.

Each row is what a user of that tool would type: the model's config, `--method`, `--precision`, `--optimizer`,
`--checkpointing`, `--stack`, the run shape and `--report` for what the source measured (allocated: the
allocator's peak; reserved: the caching allocator; device: all the GPU memory, e.g. "the longest that fits an
X GB card"). Where a source leaves a setting open, the row says what was assumed.
"""

GIB, GB = 1024**3, 10**9
LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False)
CONFIGS = {
    "Llama-3.1-8B": dict(
        LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
    ),
    "Llama-3.3-70B": dict(
        LLAMA,
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
    ),
    "Llama-3.2-3B": dict(
        LLAMA,
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "Llama-2-7B": dict(
        LLAMA,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "Llama-2-13B": dict(
        LLAMA,
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
    ),
    # Qwen-7B (v1) is a Llama-shaped decoder (RMSNorm, SwiGLU with 11008 per branch, MHA, untied head).
    "Qwen-7B": dict(
        LLAMA,
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=8192,
    ),
    "phi-1.5": dict(
        model_type="phi",
        vocab_size=51200,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        partial_rotary_factor=0.5,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "StableLM-3B": dict(  # stablelm-base-alpha-3b, a GPT-NeoX model
        model_type="gpt_neox",
        vocab_size=50688,
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=16,
        num_attention_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "StarCoder-15.5B": dict(
        model_type="gpt_bigcode",
        vocab_size=49152,
        n_embd=6144,
        n_inner=24576,
        n_layer=40,
        n_head=48,
        n_positions=8192,
        multi_query=True,
    ),
    "OPT-13B": dict(
        model_type="opt",
        vocab_size=50272,
        hidden_size=5120,
        ffn_dim=20480,
        num_hidden_layers=40,
        num_attention_heads=40,
        max_position_embeddings=2048,
        word_embed_proj_dim=5120,
    ),
}
TORCHTUNE_TARGETS = "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def row(source, model, setting, kind, reported, published_bytes, **options) -> dict:
    return dict(
        source=source,
        model=model,
        setting=setting,
        kind=kind,
        reported=reported,
        published_bytes=round(published_bytes),
        options=options,
    )


ROWS = [
    row(
        "torchtune README, RTX 4090",
        "Llama-3.1-8B",
        "QLoRA r=8, 2 x 2048 packed",
        "qlora",
        "allocated",
        7.4 * GIB,
        method="qlora",
        stack="torchtune",
        batch_size=2,
        seq_len=2048,
        lora_rank=8,
        lora_targets=TORCHTUNE_TARGETS,
    ),
    row(
        "torchtune README, RTX 4090",
        "Llama-3.1-8B",
        "LoRA r=8, 2 x 2048 packed",
        "lora",
        "allocated",
        16.2 * GIB,
        method="lora",
        stack="torchtune",
        batch_size=2,
        seq_len=2048,
        lora_rank=8,
        lora_targets=TORCHTUNE_TARGETS,
    ),
    row(
        "torchtune README, RTX 4090",
        "Llama-3.1-8B",
        "full, paged 8-bit AdamW in backward, 2 x 2048",
        "full",
        "allocated",
        18.9 * GIB,
        method="full",
        optimizer="paged-adamw-8bit",
        stack="torchtune",
        batch_size=2,
        seq_len=2048,
    ),
    row(
        "torchtune README, A100",
        "Llama-3.2-3B",
        "full, every memory option, 2 x 4096",
        "full",
        "allocated",
        17.6 * GIB,
        method="full",
        optimizer="adamw-8bit",
        checkpointing="offload",
        stack="torchtune",
        batch_size=2,
        seq_len=4096,
    ),
    # The 3B LoRA configs adapt q, v, output and the MLP at rank 64 (assumed from torchtune's llama3_2 configs).
    row(
        "torchtune README, A100",
        "Llama-3.2-3B",
        "LoRA r=64, offloaded activations, 2 x 4096",
        "lora",
        "allocated",
        8.5 * GIB,
        method="lora",
        checkpointing="offload",
        stack="torchtune",
        batch_size=2,
        seq_len=4096,
        lora_rank=64,
        lora_targets=TORCHTUNE_TARGETS,
    ),
    row(
        "torchtune README, A100",
        "Llama-3.2-3B",
        "QLoRA r=64, offloaded activations, 2 x 4096",
        "qlora",
        "allocated",
        4.6 * GIB,
        method="qlora",
        checkpointing="offload",
        stack="torchtune",
        batch_size=2,
        seq_len=4096,
        lora_rank=64,
        lora_targets=TORCHTUNE_TARGETS,
    ),
    row(
        "MeZO README fig. 2 (read off the chart)",
        "OPT-13B",
        "MeZO, fp16, MultiRC ~400 tokens x 16",
        "zeroth-order",
        "device",
        27.5 * GB,
        method="full",
        precision="fp16",
        optimizer="mezo",
        stack="hf",
        batch_size=16,
        seq_len=400,
    ),
    row(
        "personal-copilot blog (A100 40GB)",
        "StarCoder-15.5B",
        "QLoRA r=32 all-linear, FA2, GC, 4 x 2048",
        "qlora",
        "device",
        26 * GB,
        method="qlora",
        stack="hf",
        batch_size=4,
        seq_len=2048,
        lora_rank=32,
        lora_targets="all-linear",
    ),
]
for tokens, gb in [(932, 12), (2551, 16), (5789, 24), (12264, 40), (28454, 80)]:
    ROWS.append(
        row(
            "Unsloth README, HF + FA2 column",
            "Llama-3.1-8B",
            f"QLoRA r=32 all-linear, 1 x {tokens} (the longest that fits {gb} GB)",
            "qlora",
            "device",
            gb * GIB,
            method="qlora",
            stack="hf",
            batch_size=1,
            seq_len=tokens,
            lora_rank=32,
            lora_targets="all-linear",
        )
    )
for tokens, gb in [(2972, 8), (21848, 12), (40724, 16), (78475, 24)]:
    ROWS.append(
        row(
            "Unsloth README, Unsloth column",
            "Llama-3.1-8B",
            f"QLoRA r=32 all-linear, 1 x {tokens} (the longest that fits {gb} GB)",
            "qlora",
            "device",
            gb * GIB,
            method="qlora",
            stack="unsloth",
            batch_size=1,
            seq_len=tokens,
            lora_rank=32,
            lora_targets="all-linear",
        )
    )
for tokens, gb, stack in [(12106, 48, "unsloth"), (89389, 80, "unsloth"), (6916, 80, "hf")]:
    ROWS.append(
        row(
            "Unsloth Llama 3.3 blog (A100 80GB)",
            "Llama-3.3-70B",
            f"QLoRA r=32 all-linear, {stack}, 1 x {tokens} (the longest that fits {gb} GB)",
            "qlora",
            "device",
            gb * GIB,
            method="qlora",
            stack=stack,
            batch_size=1,
            seq_len=tokens,
            lora_rank=32,
            lora_targets="all-linear",
        )
    )
LITGPT_TABLE = {  # GB for bf16 / nf4 / nf4-dq, LoRA r=8 on q and v, Alpaca up to 1,304 tokens, A100 40GB
    "Llama-2-7B": (21.30, 14.14, 13.84),
    "Llama-2-13B": (38.12, 23.14, 22.55),
    "phi-1.5": (4.82, 3.78, 3.72),
    "StableLM-3B": (9.69, 6.35, 6.19),
}
QV = {"phi-1.5": "q_proj,v_proj", "StableLM-3B": "query_key_value"}  # GPT-NeoX fuses q, k and v in one linear
for model, values in LITGPT_TABLE.items():
    for (label, method, double_quant), value in zip(
        [("bf16", "lora", None), ("nf4", "qlora", "off"), ("nf4-dq", "qlora", "on")], values, strict=True
    ):
        ROWS.append(
            row(
                "litgpt resource tables (A100)",
                model,
                f"LoRA r=8 q,v, {label}, 1 x 1304",
                "lora" if method == "lora" else "qlora",
                "allocated",
                value * GB,
                method=method,
                stack="litgpt",
                batch_size=1,
                seq_len=1304,
                lora_rank=8,
                lora_targets=QV.get(model, "q_proj,v_proj"),
                double_quant=double_quant,
            )
        )
# litgpt's generate preallocates the KV cache for prompt + max_new_tokens; an Alpaca prompt and its answer: ~256.
for model, values in {"Llama-2-7B": (13.52, 4.57, 4.26), "Llama-2-13B": (26.21, 8.32, 7.72)}.items():
    for (label, precision, double_quant), value in zip(
        [("bf16", "bf16", None), ("nf4", "nf4", "off"), ("nf4-dq", "nf4", "on")], values, strict=True
    ):
        ROWS.append(
            row(
                "litgpt resource tables (A100)",
                model,
                f"inference, {label}, 1 x 256",
                "inference",
                "allocated",
                value * GB,
                method="inference",
                precision=precision,
                stack="litgpt",
                batch_size=1,
                seq_len=256,
                double_quant=double_quant,
            )
        )
for tokens, value in [(256, 20.1), (1024, 21.5), (2048, 23.8), (4096, 29.7), (8192, 36.6)]:
    ROWS.append(
        row(
            "Qwen README profiling (A100)",
            "Qwen-7B",
            f"LoRA r=64 all-linear bf16, GC, 1 x {tokens}",
            "lora",
            "device",
            value * GB,
            method="lora",
            checkpointing="on",
            stack="hf",
            batch_size=1,
            seq_len=tokens,
            lora_rank=64,
            lora_targets="all-linear",
        )
    )
