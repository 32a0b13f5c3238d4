"""Regenerate tests/openai/schemas.json from the official OpenAI OpenAPI specification.

    git clone https://github.com/openai/openai-openapi && git -C openai-openapi checkout <commit>
    python tests/openai/vendor.py openai-openapi/openapi.yaml <commit>

Copies, unmodified, the schemas this server's answers must validate against (chat completions,
chat completion chunks, model lists, errors) and every schema they reference. The tests read only
the JSON it writes, so they run offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ListModelsResponse", "ErrorResponse"]
TARGET = Path(__file__).with_name("schemas.json")


def closure(schemas: dict, roots: list) -> list:
    """The roots and every schema they reference, transitively, in the order first met."""
    seen: list = []

    def visit(name):
        if name not in seen:
            seen.append(name)
            walk(schemas[name])

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    visit(value.rsplit("/", 1)[-1])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for root in roots:
        visit(root)
    return seen


def main(spec_path: str, commit: str) -> None:
    spec = yaml.safe_load(Path(spec_path).read_text(encoding="utf-8"))
    schemas = spec["components"]["schemas"]
    names = closure(schemas, ROOTS)
    out = {
        "source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.yaml",
        "repository": "openai/openai-openapi",
        "commit": commit,
        "file": "openapi.yaml",
        "info_version": spec["info"]["version"],
        "openapi": spec["openapi"],
        "license": spec["info"].get("license", {}).get("name", ""),
        "note": "components.schemas of the official OpenAI OpenAPI specification, copied unmodified: the response "
                "schemas this server answers with (roots) and every schema they reference. Regenerate with "
                "tests/openai/vendor.py.",
        "roots": ROOTS,
        "schemas": {name: schemas[name] for name in sorted(names)},
    }
    TARGET.write_text(json.dumps(out, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
    print(f"wrote {len(names)} schemas of OpenAI's specification {out['info_version']} ({commit[:12]}) to {TARGET}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
