"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_completion.py at commit
006587544afc3ab7c830aaafe60e49e0cb6aeeb0 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except this deliberate difference:

- truncate_prompt_tokens / truncation_side are refused by name (docs/api.md): the truncation test is skipped.
"""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def ask(client, prompt: str, structured_outputs: dict, **extra):
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                          extra_body={"structured_outputs": structured_outputs, **extra})


def test_chat_completion_truncation_side_controls_prompt_truncation(client):
    pytest.skip("truncate_prompt_tokens (and truncation_side) is refused by name (docs/api.md)")


def test_invalid_json_schema(client):
    invalid_json_schema = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType", "type": "string"}},
        "properties": {"brand": {"title": "Brand", "type": "string"}, "model": {"title": "Model", "type": "string"},
                       "car_type": {"$ref": "#/$defs/CarType"}, "foo": "bar"},
        "required": ["brand", "model", "car_type"], "title": "CarDescription", "type": "object"}
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        ask(client, "Generate a JSON with the brand, model and car_type of the most iconic car from the 90's",
            {"json": invalid_json_schema})


def test_invalid_regex(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        ask(client, "Generate an email address for Alan Turing, who works in Enigma. End in .com and new line. "
            "Example result: alan.turing@enigma.com\n", {"regex": r"[.*"}, stop=["\n"])


def test_invalid_grammar(client):
    invalid_simplified_sql_grammar = """
        root ::= select_statementinvalidsyntax

        select_statement ::= "SELECT " column " from " table " where " condition

        column ::= "col_1 " | "col_2 "

        table ::= "table_1 " | "table_2 "

        condition ::= column "= " number

        number ::= "1 " | "2 "
    """
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        ask(client, "Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
            {"grammar": invalid_simplified_sql_grammar})


def test_empty_grammar(client):
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        ask(client, "Say hello", {"grammar": ""})
