"""The AI Studio tutorial's server, rebuilt as the benchmark's baseline.

    python -m bench.baseline_server --model demo-bench --port 8081

What the tutorial's `api.py` does, kept as it is:
- Flask's own server with `app.run(threaded=False)`: one request at a time;
- POST /v1/chat/completions takes the tutorial's payload (`messages[i].content` with
  `{"type": "image", "image": "<base64 or data URL>"}` and `{"type": "text", "text": ...}`);
- every image is base64-decoded, written as PNG under ./images (the working directory: the
  benchmark starts this server in a temporary folder) and read back from disk by
  `process_vision_info`; the prompt comes from the tokenizer's chat template;
  `processor(text=..., images=...)` then `model.generate`, one request at a time;
- the processor's pixel budget is the tutorial's (min 256*28*28, max 1280*28*28), top_p 0.01;
- the answer goes back as bare text; GET / answers the tutorial's text.

What differs, each for a fair comparison, not to speed it up:
- the model comes from PaddleFormers through this project's loader
  (`serving.model.loader.load_model`), so both servers run the same weights (the tutorial used
  PaddleMIX, which PyPI does not carry);
- it reads `max_tokens` (the tutorial always generates up to 256 tokens) and, for
  temperature 0, asks for greedy decoding (the tutorial passes temperature straight through);
- the response carries an `X-Completion-Tokens` header so the benchmark can count tokens;
  the body is the tutorial's bare text;
- if the loaded model does not carry its KV cache between decoding steps (PaddleFormers
  1.2.0's Qwen2.5-VL output type is missed by `update_model_kwargs_for_generation`, so every
  step recomputes the whole sequence and the vision tower), the same one-line repair is
  applied here, because the tutorial's PaddleMIX model decodes with its cache.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import traceback
import uuid
from io import BytesIO
from pathlib import Path

from flask import Flask, Response, jsonify, request
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIN_PIXELS = 256 * 28 * 28  # 200704, as in the tutorial
MAX_PIXELS = 1280 * 28 * 28  # 1003520
TOP_P = 0.01
MAX_NEW_TOKENS = 256
HOME_TEXT = "Qwen2.5-VL API服务正在运行"


def process_image(image_source, save_dir="./images"):
    """Base64 -> PNG file under ./images -> its path (the tutorial's process_image)."""
    os.makedirs(save_dir, exist_ok=True)
    try:
        if image_source.startswith(("http://", "https://")):
            return image_source
        if "base64," in image_source:
            image_source = image_source.split("base64,")[1]
        image_data = base64.b64decode(image_source)
        image = Image.open(BytesIO(image_data))
        file_name = f"{uuid.uuid4().hex}.png"
        save_path = os.path.join(save_dir, file_name)
        image.convert("RGB").save(save_path)
        return os.path.abspath(save_path)
    except Exception as e:
        raise ValueError(f"图像处理失败: {str(e)}")


def process_request_data(request_data, save_dir="./images", verbose=True):
    """The tutorial's messages -> messages whose images are file paths."""
    messages = request_data.get("messages", [])
    processed_messages = []
    for msg in messages:
        role = msg.get("role", "user")
        content = msg.get("content", [])
        processed_content = []
        for item in content if isinstance(content, list) else [{"type": "text", "text": content}]:
            if item["type"] == "text":
                processed_content.append({"type": "text", "text": item["text"]})
            elif item["type"] == "image":
                image = process_image(item["image"], save_dir)
                processed_content.append({"type": "image", "image": image})
        processed_messages.append({"role": role, "content": processed_content})
    if verbose:
        print(processed_messages)
    return processed_messages


def model_inputs(processor, messages):
    """Chat template, images read back from disk (process_vision_info), processor: the tensors generate() takes."""
    from paddleformers.transformers.qwen2_vl.vision_process import process_vision_info

    texts = [processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    image_inputs, video_inputs = process_vision_info(messages)
    return processor(text=texts, images=image_inputs, videos=video_inputs, padding=True, return_tensors="pd")


def create_app(model, processor) -> Flask:
    app = Flask(__name__)

    def generate_response(messages, temperature=0.6, max_new_tokens=MAX_NEW_TOKENS):
        import paddle

        inputs = model_inputs(processor, messages)
        extra = {"decode_strategy": "greedy_search"} if temperature == 0 else {}
        with paddle.no_grad():
            generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=TOP_P, **extra)
        output_text = processor.batch_decode(  # as lists: transformers 5 cannot index a paddle tensor
            generated_ids[0].numpy().tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return output_text[0], int(generated_ids[0].shape[-1])

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat_completions():
        print("收到处理请求")
        try:
            request_data = request.get_json()
            if not request_data:
                return jsonify({"error": {"message": "无效的请求数据", "type": "invalid_request"}}), 400
        except Exception as e:
            return jsonify({"error": {"message": f"解析请求失败: {str(e)}", "type": "parse_error"}}), 400
        temperature = request_data.get("temperature", 0.6)
        max_new_tokens = int(request_data.get("max_tokens") or MAX_NEW_TOKENS)
        try:
            processed_messages = process_request_data(request_data)
            text, tokens = generate_response(processed_messages, temperature, max_new_tokens)
            return Response(text, mimetype="text/html", headers={"X-Completion-Tokens": str(tokens)})
        except Exception as e:
            traceback.print_exc()  # the tutorial only answers 500; the log helps the benchmark's user
            return jsonify({"error": {"message": f"处理请求失败: {str(e)}", "type": "server_error"}}), 500

    @app.route("/")
    def home():
        return HOME_TEXT

    return app


def load(model_name: str):
    """The model and processor, through the same loader as our server, with the tutorial's pixel budget."""
    from serving.config import Settings
    from serving.model.loader import load_model

    loaded = load_model(Settings(model=model_name))
    tutorial_pixels(loaded.processor)
    return loaded  # with serving.model.paddle_fixes applied by the loader, as in our server


def tutorial_pixels(processor):
    """Give the processor the tutorial's pixel budget (its Qwen2_5_VLProcessor(..., min_pixels, max_pixels)).

    In place: a deep copy of PaddleFormers' fast image processor ignores changed budgets.
    """
    image_processor = processor.image_processor
    image_processor.min_pixels, image_processor.max_pixels = MIN_PIXELS, MAX_PIXELS
    image_processor.size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return processor


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="The AI Studio tutorial's server, as a benchmark baseline.")
    parser.add_argument("--model", default="demo-bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import paddle  # noqa: F401  (on the main thread, which serves every request: threaded=False)

    from serving.model.loader import ModelLoadError

    try:
        loaded = load(args.model)
    except ModelLoadError as exc:  # one line and status 2, as our server says it
        print(f"baseline: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"baseline: model {args.model} loaded", flush=True)
    app = create_app(loaded.model, loaded.processor)
    app.run(host=args.host, port=args.port, threaded=False)


if __name__ == "__main__":
    main()
