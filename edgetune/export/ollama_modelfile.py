"""The Ollama ``Modelfile`` written next to an exported GGUF: the file, the chat template in Ollama's Go-template
syntax, its stop tokens and sampling defaults.

Ollama renders prompts with its own Go templates, not the tokenizer's Jinja, so the template a run trained on has
to be translated. That is done for the templates edgetune ships (``chatml``, ``llama3``, ``zephyr``) and for a
tokenizer template that renders a conversation exactly like one of them (SmolLM2's and Qwen's ChatML do; a default
system prompt such a template adds becomes the Modelfile's ``SYSTEM``). Any other template is left to Ollama, which
reads ``tokenizer.chat_template`` from the GGUF and picks a matching template of its own if it knows one.

Reference: Ollama's Modelfile documentation (FROM, TEMPLATE, SYSTEM, PARAMETER) and its built-in templates
``chatml.gotmpl``, ``llama3-instruct.gotmpl`` and ``zephyr.gotmpl``.
"""

import json
from pathlib import Path

MODELFILE = "Modelfile"
MARKER = "# Written by `edgetune export`"
_PROBE = [
    {"role": "system", "content": "SYSTEM-TEXT"},
    {"role": "user", "content": "USER-TEXT"},
    {"role": "assistant", "content": "ASSISTANT-TEXT"},
    {"role": "user", "content": "NEXT-TEXT"},
]
_GO_TEMPLATES = {
    "chatml": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n",
    "llama3": "{BOS}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "zephyr": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{EOS}\n{{ end }}<|assistant|>\n",
}
_STOPS = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "zephyr": ["{EOS}", "<|user|>", "<|system|>"],
}
# generation_config.json field -> Ollama PARAMETER name.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}


def modelfile_text(tokenizer, gguf_name: str, run_dir: Path, generation_config: Path | None, add_bos: bool) -> str:
    """The Modelfile for ``gguf_name`` (in the same folder) of a run whose tokenizer holds its chat template.

    Args:
        tokenizer: the run's tokenizer; its ``chat_template`` is the one training rendered conversations with.
        gguf_name: the GGUF's file name.
        run_dir: the run, named in the header comment.
        generation_config: the base's ``generation_config.json``, whose sampling defaults become PARAMETERs.
        add_bos: llama.cpp adds the bos token itself, so a template must not write it again.
    """
    name, system = match_template(tokenizer)
    eos = tokenizer.eos_token or ""
    lines = [f"{MARKER} from {run_dir}. Build it: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    if name is None:
        lines.append("# The chat template is not one edgetune translates; Ollama uses the GGUF's own if it knows it.")
        stops = [eos] if eos else []
    else:
        bos = "" if add_bos or not tokenizer.bos_token else tokenizer.bos_token
        template = _GO_TEMPLATES[name].replace("{BOS}", bos).replace("{EOS}", eos)
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = [stop.replace("{EOS}", eos) for stop in _STOPS[name]]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops) if stop]
    lines += [f"PARAMETER {key} {value}" for key, value in _sampling(generation_config)]
    return "\n".join(lines) + "\n"


def match_template(tokenizer) -> tuple[str | None, str]:
    """Which built-in template the tokenizer's renders like, and the default system prompt it adds ("" if none)."""
    from edgetune.train.chat_templates import BUILTIN_TEMPLATES

    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None, ""
    for name, builtin in BUILTIN_TEMPLATES.items():
        if _render(tokenizer, template, _PROBE) != _render(tokenizer, builtin, _PROBE):
            continue
        without = _render(tokenizer, template, _PROBE[1:])
        if without == _render(tokenizer, builtin, _PROBE[1:]):
            return name, ""
        # A template that adds a system turn when the conversation has none renders it where the probe's is.
        prefix, _, rest = _render(tokenizer, builtin, _PROBE).partition("SYSTEM-TEXT")
        if len(without) > len(prefix) + len(rest) and without.startswith(prefix) and without.endswith(rest):
            return name, without[len(prefix) : len(without) - len(rest)]
        return None, ""
    return None, ""


def _render(tokenizer, template: str, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - a template that cannot render this probe matches nothing
        return ""


def _sampling(generation_config: Path | None) -> list[tuple[str, object]]:
    if generation_config is None or not generation_config.is_file():
        return []
    try:
        settings = json.loads(generation_config.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [(ollama, settings[hf]) for hf, ollama in _SAMPLING.items() if isinstance(settings.get(hf), int | float)]


def is_edgetune_modelfile(path: Path) -> bool:
    """Whether ``path`` is a Modelfile an earlier export wrote (the only kind --overwrite replaces)."""
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False
