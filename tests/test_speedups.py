"""serving.engines.builtin.speedups' pieces equal PaddleFormers' own code on the demo model's real modules:
- grouped-query attention = eager attention (repeat_kv): decoding rows with left padding, prefill chunks
  after a cache, the whole language model's logits and greedy tokens;
- the vision tower with batched windows = the library's tower (uneven windows, several images, a video);
- the one-kernel RMSNorm = the library's RMSNorm;
- the language model's attention layer with rotary tables once per pass = the library's layer, and all
  of serving.engines.builtin.speedups together = the library's code, on a prompt with an image;
- the KV cache with spare room = DynamicLayer's concatenation, through rows joining and leaving.
(The engine's greedy answers against PaddleFormers' generate on the library's code: test_continuous_batching.)"""

from __future__ import annotations

import numpy as np
import pytest

from serving.engines.builtin import decode, kv_cache, speedups
from serving.engines.builtin.speedups import attention, rms_norm, vision_tower


@pytest.fixture(scope="module")
def model(engine):
    return engine.model


def _eager():
    from paddleformers.nn.attention.eager_attention import eager_attention_forward

    return eager_attention_forward


def _qkv(module, b, q_len, length, seed=0):
    import paddle

    rng = np.random.default_rng(seed)
    heads, kv, dim = module.num_heads, module.num_key_value_heads, module.head_dim
    make = lambda *shape: paddle.to_tensor(rng.standard_normal(shape).astype("float32"))  # noqa: E731
    return make(b, heads, q_len, dim), make(b, kv, length, dim), make(b, kv, length, dim)


def _padding_mask(b, q_len, length):
    """Additive mask [b, 1, q, L] as PaddleFormers builds it: row i has i padding columns on the left, causal."""
    import paddle

    allowed = np.tril(np.ones((q_len, length), bool), k=length - q_len)[None].repeat(b, 0)
    for i in range(b):
        allowed[i, :, :i] = False
    return paddle.to_tensor(np.where(allowed, 0.0, np.finfo(np.float32).min).astype("float32")[:, None])


@pytest.mark.parametrize("b,q_len,length", [(1, 1, 7), (5, 1, 40), (3, 6, 30), (2, 17, 17)])
def test_equals_eager_with_mask(model, b, q_len, length):
    import paddle

    module = model.model.language_model.layers[0].self_attn
    assert module.num_key_value_groups > 1  # the demo model is grouped-query, as Qwen2.5-VL is
    q, k, v = _qkv(module, b, q_len, length)
    mask = _padding_mask(b, q_len, length)
    with paddle.no_grad():
        want = _eager()(module, q, k, v, attention_mask=mask, scaling=module.scaling)[0].numpy()
        got = attention.grouped_attention(module, q, k, v, attention_mask=mask, scaling=module.scaling)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_mask_means_causal(model):
    """A registered non-eager implementation gets no mask when nothing is padded: it must stay causal."""
    import paddle

    module = model.model.language_model.layers[0].self_attn
    q, k, v = _qkv(module, 1, 5, 12, seed=1)
    with paddle.no_grad():
        want = _eager()(module, q, k, v, attention_mask=_padding_mask(1, 5, 12), scaling=module.scaling)[0].numpy()
        got = attention.grouped_attention(module, q, k, v, attention_mask=None, scaling=module.scaling)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_language_model_logits_and_greedy_tokens(engine, model):
    """The whole model on a left-padded batch of two prompts, prefill then 6 greedy steps, eager vs grouped."""
    import paddle

    from tests.test_continuous_batching import wait_idle

    wait_idle(engine)
    rng = np.random.default_rng(2)
    vocab = int(model.config.text_config.vocab_size if hasattr(model.config, "text_config") else 500)
    ids = rng.integers(10, min(vocab, 500), size=(2, 23)).astype("int64")
    mask = np.ones_like(ids)
    mask[1, :9] = 0  # row 1 is left-padded

    def run(name):
        previous = attention.use(model, name)
        try:
            with paddle.no_grad():
                out = model.generate(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask),
                                     max_new_tokens=6, decode_strategy="greedy_search", use_cache=True)[0]
                logits = model(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask)).logits
            return out.numpy(), logits.numpy()
        finally:
            attention.use(model, previous)

    eager_tokens, eager_logits = run("eager")
    grouped_tokens, grouped_logits = run(attention.NAME)
    np.testing.assert_allclose(grouped_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert (grouped_tokens == eager_tokens).all()


def _pixels(engine, sizes):
    from PIL import Image

    images = [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)) for i, size in enumerate(sizes)]
    for i, img in enumerate(images):  # some texture, so the patches differ
        img.putpixel((i, i), (255, 255, 255))
    out = engine.processor.image_processor(images=images, return_tensors="pd")
    return out["pixel_values"], out["image_grid_thw"]


def _assert_close_to_scale(got, want):
    """Within fp32 rounding as it grows through the tower's blocks (random weights, outputs in the hundreds)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("sizes", [[(448, 448)], [(224, 168)], [(84, 56), (308, 140)]])
def test_vision_tower_equals_library(engine, model, sizes):
    import paddle

    visual = model.model.visual
    pixels, grid = _pixels(engine, sizes)
    with paddle.no_grad():
        want = type(visual).forward(visual, pixels, grid).numpy()
        got = vision_tower.forward(visual, pixels, grid).numpy()
    _assert_close_to_scale(got, want)


def test_vision_tower_equals_library_on_video(model):
    """Two temporal patches of one clip: full attention spans each frame pair, windows within it."""
    import paddle

    visual = model.model.visual
    grid = paddle.to_tensor(np.array([[2, 8, 12]], dtype="int64"))
    patch = int(visual.patch_embed.in_channels * visual.patch_embed.temporal_patch_size * visual.patch_size ** 2)
    pixels = paddle.to_tensor(np.random.default_rng(3).standard_normal((2 * 8 * 12, patch)).astype("float32"))
    with paddle.no_grad():
        want = type(visual).forward(visual, pixels, grid).numpy()
        got = vision_tower.forward(visual, pixels, grid).numpy()
    _assert_close_to_scale(got, want)


def test_rms_norm_equals_library(model):
    import paddle
    from paddleformers.nn.norm import RMSNorm

    norms = [model.model.language_model.layers[0].input_layernorm, model.model.visual.blocks[0].norm1]
    rng = np.random.default_rng(4)
    for norm, shape in zip(norms, ([3, 5, norms[0].hidden_size], [7, norms[1].hidden_size])):
        x = paddle.to_tensor((rng.standard_normal(shape) * 3).astype("float32"))
        with paddle.no_grad():
            np.testing.assert_allclose(rms_norm.forward(norm, x).numpy(), RMSNorm.forward(norm, x).numpy(),
                                       rtol=1e-5, atol=1e-5)


def test_roomy_kv_cache_equals_concatenation(engine, model, monkeypatch):
    """The same decoding logits, bit for bit, as rows join (left padding) and leave, over more than ROOM steps."""
    import paddle

    from tests.test_continuous_batching import wait_idle

    wait_idle(engine)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(10, 200, size=(1, n)).astype("int64") for n in (30, 70, 12, 55)]

    def run():
        batch, logits = decode.RunningBatch(model), []

        def join(i):
            result = decode.Prefill(model, {"input_ids": prompts[i]}).run(10**6)
            batch.add(i, result, 5)

        join(0)
        for step in range(kv_cache.ROOM + 10):
            if step in (3, 6, 25):
                join({3: 1, 6: 2, 25: 3}[step])
            if step in (20, 40):
                batch.keep([1, 2] if step == 20 else [0, 2])
            out = batch.step()
            logits.append(out.numpy())
            batch.set_next(out.argmax(-1).numpy().tolist())
        return logits

    with paddle.no_grad():
        roomy = run()
        monkeypatch.setattr(kv_cache, "roomy", lambda layer: layer)  # PaddleFormers' DynamicLayer as it is
        plain = run()
    assert all((a == b).all() for a, b in zip(roomy, plain))


def test_tower_block_by_block_equals_at_once(engine, model):
    """A prompt's tower run a few blocks per turn (Prefill.advance_vision) gives the same first logits
    as the tower at once, and leaves each image's features in the vision cache."""
    import paddle
    from PIL import Image

    from serving.engines.builtin.cache import ByteLRU
    from serving.protocol import ChatTurn
    from tests.test_continuous_batching import wait_idle

    wait_idle(engine)
    images = [Image.new("RGB", (112, 84), (1, 2, 3)), Image.new("RGB", (56, 140), (200, 9, 9))]
    prompt = engine.build_prompt([ChatTurn("user", [images[0], images[1], "Compare them."])])
    cache = ByteLRU(2**26, "test")
    with paddle.no_grad():
        at_once = decode.Prefill(model, prompt.arrays).run(10**6).logits.numpy()
        staged = decode.Prefill(model, prompt.arrays, vision_cache=cache, image_keys=prompt.image_keys)
        assert staged.vision_blocks_left == len(model.model.visual.blocks)
        while staged.vision_blocks_left:
            staged.advance_vision(3)
        np.testing.assert_allclose(staged.run(10**6).logits.numpy(), at_once, rtol=1e-5, atol=1e-5)
    assert all(cache.get(key) is not None for key in prompt.image_keys)


def test_all_speedups_equal_library_code(engine, model):
    """The whole model, prompt with an image then 5 greedy steps: logits and tokens, ours vs the library's."""
    import paddle
    from PIL import Image

    from serving.protocol import ChatTurn
    from tests.test_continuous_batching import wait_idle

    wait_idle(engine)
    prompt = engine.build_prompt([ChatTurn("user", [Image.new("RGB", (140, 112), (90, 30, 200)), "What is it?"])])
    inputs = {k: paddle.to_tensor(v) for k, v in prompt.arrays.items()}

    def run():
        with paddle.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=5, decode_strategy="greedy_search", use_cache=True)[0]
            logits = model(**inputs).logits
        return tokens.numpy(), logits.numpy()

    ours = run()
    with speedups.library_code(model):
        library = run()
    np.testing.assert_allclose(ours[1], library[1], rtol=1e-4, atol=1e-4)
    assert (ours[0] == library[0]).all()
