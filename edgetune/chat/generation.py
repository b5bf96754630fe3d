"""Streaming generation with a KV cache: transformers' ``generate`` with a text streamer, cancellable.

``generate`` runs in a worker thread and hands decoded text to ``TextIteratorStreamer``; the caller iterates over
the pieces as they come. Cancelling (the ``cancel`` callable returns True) stops ``generate`` at the next token
through a stopping criterion, so a desktop app's stop button takes effect within one token's time.
"""

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from edgetune.chat.models import ChatModel
from edgetune.errors import EdgetuneError


@dataclass(frozen=True)
class GenerationSettings:
    """How to answer.

    Attributes:
        max_new_tokens: the longest answer, in tokens.
        temperature: 0 answers greedily (the same answer every time); above 0 samples.
        top_p: nucleus sampling: sample from the most likely tokens whose probabilities sum to ``top_p``.
        seed: makes sampled answers repeatable.
        system: a system message placed before the conversation (chat models only).
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 2**20:
            raise EdgetuneError(f"max_new_tokens={self.max_new_tokens!r} is not a token count", "pass 1 or more")
        if not 0 <= self.temperature <= 100:
            raise EdgetuneError(f"temperature={self.temperature} is out of range", "pass 0 (greedy) up to about 2")
        if not 0 < self.top_p <= 1:
            raise EdgetuneError(f"top_p={self.top_p} is out of range", "pass a value in (0, 1], e.g. 0.9")


def prompt_ids(chat: ChatModel, messages: list[dict[str, str]], settings: GenerationSettings) -> torch.Tensor:
    """Token ids of the conversation so far (with the system message, if any), ready for the answer."""
    from edgetune.train.chat_templates import generation_prompt

    turns = ([{"role": "system", "content": settings.system}] if settings.system else []) + messages
    if not chat.has_chat_template:
        turns = messages  # a base model has no system turn to put it in
    return torch.tensor([generation_prompt(chat.tokenizer, turns)])


def stream_reply(
    chat: ChatModel,
    messages: list[dict[str, str]],
    settings: GenerationSettings | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Yield the answer to ``messages`` piece by piece as it is generated.

    Raises:
        EdgetuneError: no messages, or the last one is not the user's.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    settings = settings or GenerationSettings()
    if not messages or messages[-1].get("role") != "user":
        raise EdgetuneError("nothing to answer", "end the conversation with a user message")
    ids = prompt_ids(chat, messages, settings).to(chat.device)
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)

    class _Cancelled(StoppingCriteria):  # transformers' hook for stopping generate between tokens
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            stop = bool(cancel and cancel())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    arguments = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.temperature > 0,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Cancelled()]),
        pad_token_id=chat.tokenizer.pad_token_id or chat.tokenizer.eos_token_id,
        use_cache=True,
    )
    if settings.temperature > 0:
        arguments.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    failure: list[BaseException] = []
    worker = threading.Thread(target=_generate, args=(chat, arguments, settings.seed, failure), daemon=True)
    worker.start()
    yield from (piece for piece in streamer if piece)
    worker.join()
    if failure:
        raise failure[0]


def _generate(chat: ChatModel, arguments: dict, seed: int | None, failure: list[BaseException]) -> None:
    try:
        if seed is not None:
            torch.manual_seed(seed)  # generate samples from the global generator
        with torch.no_grad():
            chat.model.generate(**arguments)
    except BaseException as exc:  # handed to the caller's thread; the streamer must still end
        failure.append(exc)
        arguments["streamer"].end()


def reply(chat: ChatModel, messages, settings=None, cancel=None) -> str:
    """The whole answer at once (see ``stream_reply``)."""
    return "".join(stream_reply(chat, messages, settings, cancel))
