"""Stand-in for `python -m fastdeploy.entrypoints.openai.api_server` (tests/stand_ins/README.md).

Takes FastDeploy's flags, checks what its Qwen2.5-VL guide asks for, then serves this project's own
server on --port with --model, so the launcher in serving/engines/fastdeploy.py is tested end to end.
"""

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[5]  # the project: tests/stand_ins/fastdeploy/entrypoints/openai/
sys.path.insert(0, str(ROOT))


def say(text):
    print(f"api_server.py[standin] {text}", flush=True)


def parse(argv):
    p = argparse.ArgumentParser(prog="fastdeploy.entrypoints.openai.api_server")
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8001)
    p.add_argument("--engine-worker-queue-port", type=int, default=8002)
    p.add_argument("--cache-queue-port", type=int, default=8003)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--limit-mm-per-prompt", type=json.loads, default={"image": 1, "video": 1})
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--quantization")
    p.add_argument("--tool-call-parser")
    p.add_argument("--guided-decoding-backend")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    config = json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8"))
    record = os.environ.get("FASTDEPLOY_STANDIN_RECORD")
    if record:
        Path(record).write_text(json.dumps({
            "argv": sys.argv[1:], "pid": os.getpid(), "pgid": os.getpgid(0),
            "env": {k: os.environ.get(k) for k in ("ENABLE_V1_KVCACHE_SCHEDULER", "PORT", "MODEL", "API_KEY",
                                                   "BACKEND")},
            "model": args.model, "config": config}))
    say(f"args: {vars(args)}")
    if config.get("rope_3d") is not True or config.get("freq_allocation") != 16:
        say("ERROR Qwen2.5-VL needs \"rope_3d\": true and \"freq_allocation\": 16 in config.json")
        return 1
    if os.environ.get("ENABLE_V1_KVCACHE_SCHEDULER") != "1":
        say("ERROR Qwen2.5-VL needs ENABLE_V1_KVCACHE_SCHEDULER=1")
        return 1
    mode = os.environ.get("FASTDEPLOY_STANDIN_MODE", "serve")
    if mode == "fail":
        say("loading weights ...")
        say("ERROR simulated failure: CUDA error 100: no CUDA-capable device is detected")
        return 3
    held = []  # FastDeploy's other ports: bound, as FastDeploy would (proves they were free)
    for port in (args.metrics_port, args.engine_worker_queue_port, args.cache_queue_port):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        held.append(s)
    time.sleep(float(os.environ.get("FASTDEPLOY_STANDIN_DELAY", "0")))

    from serving.web.app import create_app
    from serving.config import Settings
    from serving.web.server import configure_logging, serve

    settings = Settings(model=args.model, host=args.host, port=args.port, served_model_name=args.served_model_name or "",
                        max_batch_size=args.max_num_seqs, max_images=int(args.limit_mm_per_prompt.get("image", 1)),
                        max_tokens_limit=args.max_model_len)
    configure_logging("INFO")
    if mode.startswith("die:"):
        threading.Thread(target=die_after_ready, args=(args.port, float(mode[4:])), daemon=True).start()
    say(f"Launching chat completion service at http://{args.host}:{args.port}/v1/chat/completions")
    serve(create_app(settings), settings)
    return 0


def die_after_ready(port, seconds):
    import requests

    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    time.sleep(seconds)
    say("ERROR worker process 0 died: simulated crash (illegal memory access)")
    os._exit(7)


if __name__ == "__main__":
    sys.exit(main())
