"""Request parsing: every content-part form, and the errors for bad ones."""

import pytest

from serving.errors import InvalidRequest
from serving.web.http_errors import problem
from serving.protocol import ImageRef, normalise_messages, parse_request


def turns_of(body):
    return normalise_messages(parse_request(body))


def test_all_content_forms_normalise_to_one_shape():
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "auto"}},
            {"type": "image_url", "image_url": "https://example.com/a.png"},
            {"type": "image", "image": "AAAA", "max_pixels": 50000},
        ]},
        {"role": "assistant", "content": "ok"},
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": "and?"},
    ]}
    turns = turns_of(body)
    assert [t.role for t in turns] == ["system", "user", "assistant", "system", "user"]
    parts = turns[1].parts
    assert parts[0] == "Compare "
    assert [p.source for p in parts[1:]] == ["data:image/png;base64,AAAA", "https://example.com/a.png", "AAAA"]
    assert all(isinstance(p, ImageRef) for p in parts[1:])
    assert parts[3].max_pixels == 50000 and parts[3].param == "messages[1].content[3]"


def test_parameters():
    req = parse_request({"messages": [{"role": "user", "content": "x"}], "stop": "END", "max_completion_tokens": 5,
                         "seed": 3, "stream": True, "stream_options": {"include_usage": True}, "whatever": 1})
    assert req.stop == ["END"] and req.max_completion_tokens == 5 and req.stream_options.include_usage
    assert req.model_extra == {"whatever": 1}


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),  # 1 to 16 choices
    ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequest) as info:
        turns_of(body)
    assert problem(info.value).status == 400
    assert info.value.param == param
    assert info.value.message.startswith(param)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": "only a system prompt"}],
    [{"role": "assistant", "content": [{"type": "image", "image": "AAAA"}]}, {"role": "user", "content": "x"}],
])
def test_semantic_errors(messages):
    with pytest.raises(InvalidRequest):
        turns_of({"messages": messages})
