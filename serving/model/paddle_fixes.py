"""Fixes to PaddleFormers 1.2.0's Qwen2.5-VL, applied to a loaded model.

1. The KV cache is never carried from one decoding step to the next: `generate` only keeps
   `past_key_values` from outputs of type CausalLMOutputWithPast, and Qwen2.5-VL returns its own
   output class. Every step then re-runs the whole sequence, vision tower included (measured
   here: 64 tokens of a 1000-token image prompt took minutes instead of seconds).
2. `get_rope_index` on a text-only batch with an attention mask uses torch's `max(dim)[0]`
   idiom, which in Paddle indexes the first row, so the rope deltas lose their batch axis and the
   second decoding step fails once the cache is in use.

3. Kernel choices follow the device the model runs on, not the checkpoint: PaddleFormers' RMSNorm
   calls the fused kernel `fused_rms_norm_ext` unless the config says `fuse_rms_norm: false`, and
   that kernel has no CPU implementation ("kernel fused_rms_norm_ext is not registered" on every
   request). Published checkpoints do not carry the flag, so on a CPU it is set to false on the
   loaded config objects (top level, text_config, vision_config and any other a layer holds).

The first two are instance-level wrappers: the library's own code still does all the work.
"""

from __future__ import annotations


def apply(model, device: str = "cpu") -> None:
    _carry_kv_cache(model)
    _fix_text_only_rope_index(model)
    use_device_kernels(model, device)


def use_device_kernels(model, device: str) -> list:
    """Turn fused RMSNorm off on a CPU, in every config object the model and its layers read it from
    (the norms look it up at each call); returns those configs."""
    if device != "cpu":
        return []
    configs = {}
    for holder in [model, *model.sublayers()]:
        config = getattr(holder, "config", None)
        for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
            if c is not None and hasattr(c, "get"):
                configs[id(c)] = c
    for c in configs.values():
        c.fuse_rms_norm = False
    return list(configs.values())


def _carry_kv_cache(model) -> None:
    original = model.update_model_kwargs_for_generation

    def update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False):
        model_kwargs = original(outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder)
        cache = getattr(outputs, "past_key_values", None)
        if cache is not None:
            model_kwargs["past_key_values"] = cache
        return model_kwargs

    model.update_model_kwargs_for_generation = update_model_kwargs_for_generation


def _fix_text_only_rope_index(model) -> None:
    inner = model.model
    original = inner.get_rope_index

    def get_rope_index(input_ids=None, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                       attention_mask=None):
        if image_grid_thw is not None or video_grid_thw is not None or attention_mask is None:
            return original(input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)
        import paddle

        mask = attention_mask.astype("int64")
        position_ids = mask.cumsum(-1) - 1
        position_ids = paddle.where(mask == 0, paddle.ones_like(position_ids), position_ids)
        position_ids = position_ids.unsqueeze(0).expand([3, -1, -1])
        max_position = position_ids.max(axis=0).max(axis=-1, keepdim=True)  # [batch, 1]
        return position_ids, max_position + 1 - mask.shape[-1]

    inner.get_rope_index = get_rope_index
