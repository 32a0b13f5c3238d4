"""Qwen2.5-VL behind an OpenAI-compatible HTTP API, with PaddlePaddle.

    python api.py --model demo          # the offline random-weight demo model
    python api.py                       # Qwen/Qwen2.5-VL-3B-Instruct from AI Studio's hub
    python api.py --model /path/to/Qwen2.5-VL-3B-Instruct --port 8080

Every flag has an environment variable of the same name (--max-pixels / MAX_PIXELS);
`python api.py --help` lists them. The logic lives in the `serving` package.
"""

from serving.app import create_app
from serving.config import load_settings
from serving.server import configure_logging, serve

if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    serve(app, settings)
