"""Chat templates a user can give a model that has none, or use instead of its own (``data.chat_template``).

``data.chat_template`` is a built-in name (``chatml``, ``llama3``, ``zephyr``) or the path of a Jinja file. The
template is set on the tokenizer before the data is tokenized, and the run saves that tokenizer with its adapter, so
``edgetune chat`` and every exporter later render prompts exactly as training did.

The built-ins follow the published templates of the formats they are named after (Qwen2.5's ChatML, Meta's
Llama 3 instruct template, HuggingFaceH4/zephyr-7b-beta), reduced to what a text-only fine-tune needs:
- Tool calls on an assistant turn are written as JSON inside ``<tool_call>`` tags (Qwen2.5's ChatML way) and
  ``tools`` as a JSON list in the system turn, so tool-use data trains on every template, not only on models
  whose own template knows tools.
- zephyr's generation prompt is ``<|assistant|>`` plus the newline its assistant turns start with (the published
  one omits the newline, so a trained model would see a different prefix at inference than in training).
- No default system prompt is added: the data's own system turns are the only ones.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from edgetune.errors import EdgetuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Shared Jinja pieces: tools as a JSON list, and an assistant turn's tool calls, each as one tagged JSON object.
_TOOLS = (
    "{%- if tools %}{%- set tool_text = '# Tools\\n' + (tools | tojson) %}{%- else %}{%- set tool_text = '' %}"
    "{%- endif %}"
)
_CALLS = (
    "{%- if message.get('tool_calls') %}{%- for call in message['tool_calls'] %}"
    "{%- set fn = call.get('function', call) %}"
    "{{- '\\n<tool_call>\\n' + ({'name': fn['name'], 'arguments': fn.get('arguments')} | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
)
# A system turn is written first when the data has one or tools need one.
_SYSTEM_FIRST = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- set system = (system + '\\n\\n' + tool_text) if (system and tool_text) else (system or tool_text) %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _TOOLS
    + _SYSTEM_FIRST
    + "{%- if system %}{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in rest %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    + _CALLS
    + "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    # Llama 3 calls the tool-result role "ipython".
    "llama3": _TOOLS + _SYSTEM_FIRST + "{{- bos_token }}"
    "{%- if system %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in rest %}{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    + _CALLS
    + "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    "zephyr": _TOOLS + _SYSTEM_FIRST + "{%- if system %}{{- '<|system|>\\n' + system + eos_token + '\\n' }}{%- endif %}"
    "{%- for message in rest %}{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    + _CALLS
    + "{{- eos_token + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}",
}

# The token that ends an assistant turn; a model can only learn to stop if it is one token of its vocabulary.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def resolve_template(value: str) -> str:
    """The Jinja text ``data.chat_template`` names.

    Args:
        value: a built-in name or the path of a Jinja file.

    Returns:
        The template text.

    Raises:
        EdgetuneError: neither a built-in nor a readable, non-empty UTF-8 file.
    """
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value).expanduser()
    names = ", ".join(BUILTIN_TEMPLATES)
    if not path.is_file():
        raise EdgetuneError(
            f"data.chat_template={value!r} is neither a built-in template nor a file",
            f"use one of {names}, or the path of a Jinja template file",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"cannot read the chat template {path} ({exc})", "save it as a UTF-8 text file") from None
    if not text.strip():
        raise EdgetuneError(
            f"the chat template {path} is empty", f"write a Jinja template in it, or use one of {names}"
        )
    return text


def apply_template(tokenizer: "PreTrainedTokenizerBase", value: str | None) -> list[str]:
    """Set ``data.chat_template`` on the tokenizer; None keeps the model's own.

    Args:
        tokenizer: the run's tokenizer, changed in place.
        value: a built-in name, a Jinja file, or None.

    Returns:
        Warnings for the user: empty, or one saying that the template's end-of-turn marker is not a single token
        of this vocabulary (the model then learns it as several tokens and generation needs it as a stop string).
    """
    if value is None:
        return []
    tokenizer.chat_template = resolve_template(value)
    marker = END_OF_TURN.get(value)
    if marker is None or len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1:
        return []
    return [
        f"the {value} template's end-of-turn marker {marker} is not one token of this tokenizer; the model learns "
        "it as text (a model with its own chat template usually needs no data.chat_template)"
    ]


def require_template(tokenizer: "PreTrainedTokenizerBase", fmt: str) -> None:
    """Refuse conversational data for a tokenizer without a chat template, naming the key that fixes it.

    Raises:
        EdgetuneError: the tokenizer has no chat template.
    """
    if getattr(tokenizer, "chat_template", None):
        return
    raise EdgetuneError(
        f"{fmt} data is rendered with a chat template and this model's tokenizer has none (a base model)",
        f"set data.chat_template to one of {', '.join(BUILTIN_TEMPLATES)} or a Jinja file",
    )


def generation_prompt(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ending where the assistant's answer starts (``edgetune chat``, eval.prompts).

    A tokenizer without a chat template (a base model) continues the last message's text as it is.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(messages[-1]["content"])["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)
