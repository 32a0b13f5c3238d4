"""Loading Qwen2.5-VL: the offline demo checkpoint, local folders, hub downloads, device and dtype choices."""
