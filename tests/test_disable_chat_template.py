"""FastDeploy's disable_chat_template (issue 20): the one message's text is the prompt as written, so a client that
writes Qwen's chat markup itself gets the templated request's prompt and, greedy, its answer."""

from __future__ import annotations

from test_peer_fields import ask, refused

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "return_token_ids": True, "max_tokens": 10}
QUESTION = "Hello, how are you?"
# Qwen2.5-VL's template, written by hand (the demo checkpoint carries the published template)
WRITTEN = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
           f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_a_hand_written_template_answers_as_the_template(client):
    templated = ask(client, messages=[{"role": "user", "content": QUESTION}], disable_chat_template=False, **GREEDY)
    written = ask(client, messages=[{"role": "user", "content": WRITTEN}], disable_chat_template=True, **GREEDY)
    assert written["prompt_token_ids"] == templated["prompt_token_ids"]
    assert written["choices"][0]["message"]["content"] == templated["choices"][0]["message"]["content"]
    for count in ("prompt_tokens", "completion_tokens"):
        assert written["usage"][count] == templated["usage"][count]
    parts = ask(client, messages=[{"role": "user", "content": [{"type": "text", "text": WRITTEN[:40]},
                                                               {"type": "text", "text": WRITTEN[40:]}]}],
                disable_chat_template=True, n=2, **GREEDY)
    assert [c["message"]["content"] for c in parts["choices"]] == [templated["choices"][0]["message"]["content"]] * 2
    raw = ask(client, messages=[{"role": "user", "content": QUESTION}], disable_chat_template=True, **GREEDY)
    assert raw["usage"]["prompt_tokens"] < templated["usage"]["prompt_tokens"]  # no markup added


def test_what_needs_the_template_is_a_400(client):
    two = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    assert "exactly one message" in refused(client, "disable_chat_template", messages=two, disable_chat_template=True)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                          {"type": "text", "text": "y"}]}]
    refused(client, "messages[0].content", messages=image, disable_chat_template=True)
    refused(client, "add_generation_prompt", disable_chat_template=True, add_generation_prompt=True)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused(client, "tools", disable_chat_template=True, tools=[tool])


def test_an_engine_without_it_refuses_it(settings):
    from fake_engine import FakeEngine
    from serving.web.app import create_app

    fake = create_app(settings, FakeEngine()).test_client()
    refused(fake, "disable_chat_template", "unsupported_parameter", disable_chat_template=True)
