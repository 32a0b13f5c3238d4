"""The KV cache really carries across decoding steps (the engine's loop, and PaddleFormers' generate with
serving.model.paddle_fixes), and gives the answers of full recomputation."""

import numpy as np
import paddle
from PIL import Image

from serving.jobs import SamplingParams
from serving.protocol import ChatTurn


def reference_greedy(engine, prompt, max_tokens):
    """PaddleFormers' generate without a cache: every step recomputes the whole sequence."""
    inputs = {k: paddle.to_tensor(v) for k, v in prompt.arrays.items()}
    with paddle.no_grad():
        ids, _ = engine.model.generate(**inputs, max_new_tokens=max_tokens, decode_strategy="greedy_search",
                                       eos_token_id=engine.eos_token_ids, pad_token_id=engine.pad_token_id,
                                       use_cache=False, repetition_penalty=1.0)
    tokens = ids.numpy()[0].tolist()
    for i, t in enumerate(tokens):
        if t in engine.eos_token_ids:
            return tokens[:i]
    return tokens


def engine_greedy_tokens(engine, prompt, max_tokens):
    text = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                          repetition_penalty=1.0)).text
    return text


def test_cached_decoding_matches_full_recomputation(engine):
    img = Image.effect_noise((112, 140), 50).convert("RGB")
    for turns in ([ChatTurn("user", ["Hello there, how are you?"])], [ChatTurn("user", [img, "Describe."])]):
        prompt = engine.build_prompt(turns)
        reference = engine.tokenizer.decode(reference_greedy(engine, prompt, 24), skip_special_tokens=True)
        assert engine_greedy_tokens(engine, prompt, 24) == reference


def test_vision_tower_runs_once_and_steps_feed_one_token(engine, monkeypatch, no_prefix_cache):
    calls = {"vision": 0, "step_lengths": []}
    visual = engine.model.model.visual
    original_forward = visual.forward

    def counting_forward(*args, **kwargs):
        calls["vision"] += 1
        return original_forward(*args, **kwargs)

    def record_tokens_embedded(layer, inputs, output):  # every forward pass embeds its new tokens first
        calls["step_lengths"].append(int(output.shape[1]))

    monkeypatch.setattr(visual, "forward", counting_forward)
    hook = engine.model.model.get_input_embeddings().register_forward_post_hook(record_tokens_embedded)
    img = Image.effect_noise((84, 84), 30).convert("RGB")  # an image no other test uses: not cached
    prompt = engine.build_prompt([ChatTurn("user", [img, "Describe this."])])
    try:
        result = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.0))
    finally:
        hook.remove()
    assert calls["vision"] == 1
    assert calls["step_lengths"][0] == prompt.prompt_tokens
    assert set(calls["step_lengths"][1:]) <= {1}
    assert len(calls["step_lengths"]) == result.finish.completion_tokens or result.finish.finish_reason == "stop"


def test_text_only_batch_rope_deltas_keep_the_batch_axis(engine):
    mask = paddle.to_tensor(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64))
    ids = paddle.to_tensor(np.ones((2, 5), dtype=np.int64))
    positions, deltas = engine.model.model.get_rope_index(ids, attention_mask=mask)
    assert tuple(deltas.shape) == (2, 1)
    assert deltas.numpy().tolist() == [[-2], [0]]
    assert positions.numpy()[0, 0].tolist() == [1, 1, 0, 1, 2]
