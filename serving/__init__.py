"""Qwen2.5-VL behind an OpenAI-compatible API with PaddlePaddle: the package all of api.py's logic lives in."""

from serving.quiet import silence_library_noise

silence_library_noise()  # before anything imports Paddle or PaddleFormers (serving/quiet.py says what and why)
