"""Running an exported graph (``edgetune.export.onnx_graph``) in onnxruntime: prefill and greedy decoding.

Everything here is numpy and onnxruntime, the way a deployment runs the file: the cache's layout is read from
the session's inputs, so nothing needs the model's config.
"""

from dataclasses import dataclass

import numpy as np

from edgetune.export.onnx_graph import PAST, PRESENT


def cpu_session(path, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` intra-op threads (None: onnxruntime's default, one per core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """A past of length 0 for every cache input: what a prefill passes."""
    past = {}
    for spec in session.get_inputs():
        if spec.name.startswith(PAST + "."):
            _, kv_heads, _, head_dim = spec.shape
            past[spec.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return past


def position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Positions of the last ``new`` tokens: count of kept tokens before each one (left padding skips ahead)."""
    return np.clip(attention_mask.cumsum(-1) - 1, 0, None)[:, -new:].astype(np.int64)


def prefill_logits(session, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``[batch, seq, vocab]`` logits of whole prompts, with an empty past (the graph without its cache)."""
    feed = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask, input_ids.shape[1]),
        **empty_past(session, input_ids.shape[0]),
    }
    return session.run(["logits"], feed)[0]


@dataclass(frozen=True)
class CachedDecode:
    """Greedy decoding with the cache: the tokens, each step's last-position logits and the cache length after it."""

    tokens: list[int]
    step_logits: np.ndarray  # [steps, vocab]
    cache_lengths: list[int]


def greedy_with_cache(session, prompt: list[int], tokens: int) -> CachedDecode:
    """``tokens`` greedy tokens after ``prompt``: one prefill, then one token per step, presents fed back as past."""
    names = [out.name for out in session.get_outputs()]
    ids = np.array([prompt], dtype=np.int64)
    past = empty_past(session, 1)
    chosen, logits_seen, lengths = [], [], []
    for _ in range(tokens):
        total = len(prompt) + len(chosen)
        mask = np.ones((1, total), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, ids.shape[1]), **past}
        outputs = dict(zip(names, session.run(None, feed), strict=True))
        last = outputs["logits"][0, -1]
        chosen.append(int(last.argmax()))
        logits_seen.append(last)
        past = {name.replace(PRESENT, PAST, 1): value for name, value in outputs.items() if name.startswith(PRESENT)}
        lengths.append(next(iter(past.values())).shape[2])
        ids = np.array([[chosen[-1]]], dtype=np.int64)
    return CachedDecode(chosen, np.stack(logits_seen), lengths)


def greedy_without_cache(session, prompt: list[int], tokens: int) -> list[int]:
    """Greedy decoding that reruns the whole sequence every step, as the graph without a cache had to."""
    ids = list(prompt)
    for _ in range(tokens):
        batch = np.array([ids], dtype=np.int64)
        ids.append(int(prefill_logits(session, batch, np.ones_like(batch))[0, -1].argmax()))
    return ids[len(prompt) :]
