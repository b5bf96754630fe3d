import pytest
from conftest import make_tokenizer

from edgetune.errors import EdgetuneError
from edgetune.train.chat_templates import BUILTIN_TEMPLATES, apply_template, require_template, resolve_template

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
]


def test_chatml_renders_like_qwen_chatml():
    tok = make_tokenizer()
    apply_template(tok, "chatml")
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
        "<|im_start|>assistant\nhi there<|im_end|>\n"
    )
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_llama3_renders_headers_and_eot():
    tok = make_tokenizer(bos=True)
    warnings = apply_template(tok, "llama3")
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nhi there<|eot_id|>")
    # <|eot_id|> is not a token of the test tokenizer: the user is told the model learns it as text.
    assert warnings and "<|eot_id|>" in warnings[0]


def test_zephyr_generation_prompt_is_a_prefix_of_the_assistant_turn():
    tok = make_tokenizer()
    apply_template(tok, "zephyr")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt) :] == "hi there<|endoftext|>\n"


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_renders_tool_calls_and_tools(name):
    tok = make_tokenizer(bos=True)
    apply_template(tok, name)
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "# Tools" in text and "rain" in text and "It rains." in text


def test_no_template_keeps_the_models_own():
    tok = make_tokenizer()
    own = tok.chat_template
    assert apply_template(tok, None) == [] and tok.chat_template == own


def test_a_template_file_is_read(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_template(str(path)) == path.read_text()


@pytest.mark.parametrize("content", [None, "  \n"])
def test_missing_or_empty_template_files_get_one_line(tmp_path, content):
    path = tmp_path / "t.jinja"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgetuneError) as caught:
        resolve_template(str(path))
    assert "\n" not in str(caught.value) and ("chatml" in str(caught.value))


def test_a_base_model_without_template_names_the_key():
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(EdgetuneError, match="data.chat_template"):
        require_template(tok, "alpaca")
