"""The built-in engine: PaddleFormers' Qwen2.5-VL driven one step at a time with continuous batching."""
