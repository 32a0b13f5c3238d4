"""/openapi.json: an OpenAPI 3.1 description built from the pydantic models that validate requests."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from serving import completions, protocol

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict:
    meaning = {400: "invalid request", 401: "missing or invalid API key", 404: "not found",
               405: "method not allowed", 413: "request body too large",
               415: "the body is not sent as application/json", 429: "server busy (see Retry-After)",
               500: "internal error", 503: "model still loading, or the engine cannot serve (see Retry-After)",
               504: "request timed out"}
    return {str(s): _json("ErrorResponse", meaning[s]) for s in statuses}


# /tokenize and /detokenize take the bodies of llama.cpp and vLLM (serving.completions); described by hand
TOKENIZE = {"type": "object", "properties": {
    "content": {"type": "string", "description": "the text (llama.cpp)"},
    "prompt": {"type": "string", "description": "the text (vLLM)"},
    "messages": {"type": "array", "items": {"type": "object"}, "description": "a chat: its prompt's tokens"},
    "add_generation_prompt": {"type": "boolean"}, "continue_final_message": {"type": "boolean"},
    "with_pieces": {"type": "boolean"}, "return_token_strs": {"type": "boolean"}}}
DETOKENIZE = {"type": "object", "required": ["tokens"],
              "properties": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}


def build_spec(settings, version: str = "1.0") -> dict:
    models = [(protocol.ChatCompletionRequest, "validation"), (protocol.ChatCompletion, "serialization"),
              (protocol.ChatCompletionChunk, "serialization"), (protocol.ModelList, "serialization"),
              (protocol.ErrorResponse, "serialization"), (protocol.Health, "serialization"),
              (completions.CompletionRequest, "validation")]
    _, top = models_json_schema(models, ref_template=REF)
    v1_errors = (401, 500) if settings.api_key else (500,)
    chat_errors = _errors(400, 413, 415, 429, 503, 504, *v1_errors)
    chat_ok = {"description": "a chat.completion, or with stream=true server-sent chat.completion.chunk events "
                              "ending with 'data: [DONE]'",
               "content": {"application/json": {"schema": _ref("ChatCompletion")},
                           "text/event-stream": {"schema": {"type": "string"}}}}
    text = {"content": {"text/plain": {"schema": {"type": "string"}}}}
    completion_ok = {"description": "a text_completion, or with stream=true server-sent text_completion events "
                                    "ending with 'data: [DONE]'",
                     "content": {"application/json": {"schema": {"type": "object"}},
                                 "text/event-stream": {"schema": {"type": "string"}}}}
    tokenizer_errors = _errors(400, 413, 415, 503, *v1_errors)
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "Qwen2.5-VL OpenAI-compatible API", "version": version,
                 "description": f"Serving {settings.model_name} with PaddlePaddle."},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "summary": "chat completion (OpenAI's format or the "
                                                                  "AI Studio tutorial's)",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
                "responses": {"200": chat_ok, **chat_errors}}},
            "/v1/completions": {"post": {
                "operationId": "createCompletion", "summary": "legacy text completion (a raw prompt: text or "
                                                              "token ids; logprobs, echo, n, streaming)",
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref("CompletionRequest")}}},
                "responses": {"200": completion_ok, **chat_errors}}},
            "/tokenize": {"post": {
                "operationId": "tokenize", "summary": "token ids of a text (llama.cpp's content, vLLM's prompt) "
                                                      "or of a chat's prompt (messages)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": TOKENIZE}}},
                "responses": {"200": {"description": "tokens (ids, or id and piece with with_pieces), count, "
                                                     "max_model_len",
                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                              **tokenizer_errors}}},
            "/detokenize": {"post": {
                "operationId": "detokenize", "summary": "the text of token ids",
                "requestBody": {"required": True, "content": {"application/json": {"schema": DETOKENIZE}}},
                "responses": {"200": {"description": "the text, as content (llama.cpp) and prompt (vLLM)",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "required": ["content", "prompt"],
                                          "properties": {"content": {"type": "string"},
                                                         "prompt": {"type": "string"}}}}}},
                              **tokenizer_errors}}},
            "/v1/models": {"get": {"operationId": "listModels", "summary": "the model served",
                                   "responses": {"200": _json("ModelList", "the model list"),
                                                 **_errors(503, *v1_errors)}}},
            "/health": {"get": {"operationId": "health", "summary": "ready or still loading",
                                "responses": {"200": _json("Health", "ready"),
                                              "503": _json("Health", "the model is still loading, or the engine cannot serve")}}},
            "/": {"get": {"operationId": "root", "summary": "a plain-text banner",
                          "responses": {"200": {"description": "the banner", **text}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition format", **text}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "this document",
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {
                                                                "schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": top["$defs"]},
    }
    if settings.api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"):
            for operation in spec["paths"][path].values():
                operation["security"] = [{"bearer": []}]
    return spec
