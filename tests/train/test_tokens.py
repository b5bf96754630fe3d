import pytest
from conftest import make_tokenizer

from edgetune.errors import EdgetuneError
from edgetune.train.tokens import IGNORE_INDEX, sample_pairs, truncate_pairs

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
    ]
}


def _decoded_targets(tok, pair):
    ids, labels = pair
    return tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_only_assistant_turns_are_in_the_loss():
    tok = make_tokenizer()
    (pair,) = sample_pairs([CONVERSATION], tok)
    assert _decoded_targets(tok, pair) == "hi there<|im_end|>fine<|im_end|>"


def test_train_on_prompt_puts_every_token_in_the_loss():
    tok = make_tokenizer()
    (pair,) = sample_pairs([CONVERSATION], tok, train_on_prompt=True)
    assert pair[0] == pair[1]
    (masked,) = sample_pairs([CONVERSATION], tok)
    assert masked[0] == pair[0]


def test_tool_calls_are_in_the_loss_and_tool_results_are_not():
    tok = make_tokenizer()
    tok.chat_template = None
    from edgetune.train.chat_templates import apply_template

    apply_template(tok, "chatml")
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "RESULT"},
            {"role": "assistant", "content": "done"},
        ]
    }
    (pair,) = sample_pairs([row], tok)
    targets = _decoded_targets(tok, pair)
    assert '"name": "f"' in targets and "done" in targets and "RESULT" not in targets


def test_prompt_completion_strings_put_the_completion_in_the_loss():
    tok = make_tokenizer()
    (pair,) = sample_pairs([{"prompt": "hello ", "completion": "world"}], tok)
    assert _decoded_targets(tok, pair) == "world<|endoftext|>"


def test_a_template_without_assistant_turns_is_refused_in_one_line():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(EdgetuneError, match="renders no assistant turn") as caught:
        sample_pairs([CONVERSATION], tok)
    assert "\n" not in str(caught.value)


def test_a_failing_template_names_the_conversation():
    tok = make_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(EdgetuneError, match="conversation 1 .*roles must alternate"):
        sample_pairs([CONVERSATION], tok)


def test_truncation_counts_cut_and_dropped_pairs():
    pairs = [([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]), ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3])]
    kept, n_truncated, n_dropped = truncate_pairs(pairs, 2)
    assert kept == [] and n_truncated == 2 and n_dropped == 2
    kept, n_truncated, n_dropped = truncate_pairs(pairs, 3)
    assert len(kept) == 2 and n_truncated == 1 and n_dropped == 0


def test_a_conversational_prompt_keeps_its_earlier_assistant_turns_out_of_the_loss():
    tok = make_tokenizer()
    sample = dict(CONVERSATION, answer_from=4)  # the prompt ends with the second user turn
    (pair,) = sample_pairs([sample], tok)
    assert _decoded_targets(tok, pair) == "fine<|im_end|>"
