"""The engine on the real Paddle model code (demo checkpoint)."""

from PIL import Image

from serving.engines.builtin.engine import Finished
from serving.jobs import SamplingParams
from serving.protocol import ChatTurn


def red(size=(96, 64)):
    return Image.new("RGB", size, (220, 20, 20))


def blue(size=(64, 96)):
    return Image.new("RGB", size, (20, 20, 220))


def greedy(engine, turns, max_tokens=12, **kw):
    prompt = engine.build_prompt(turns)
    return prompt, engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, **kw))


def test_text_only(engine):
    prompt, result = greedy(engine, [ChatTurn("user", ["Hello, who are you?"])])
    assert prompt.image_count == 0 and "pixel_values" not in prompt.arrays
    assert result.finish.prompt_tokens == prompt.prompt_tokens
    assert 1 <= result.finish.completion_tokens <= 12
    assert result.finish.finish_reason in ("stop", "length")
    assert "<|im_start|>user\nHello, who are you?<|im_end|>" in prompt.text


def test_one_image_adds_vision_tokens(engine):
    text_only = engine.build_prompt([ChatTurn("user", ["Describe this image."])])
    prompt, result = greedy(engine, [ChatTurn("user", [red(), "Describe this image."])])
    assert prompt.image_count == 1
    grid = prompt.arrays["image_grid_thw"]
    image_tokens = int(grid.prod()) // 4  # 2x2 patches merge into one token
    image_pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((prompt.arrays["input_ids"] == image_pad).sum()) == image_tokens
    assert prompt.prompt_tokens == text_only.prompt_tokens + image_tokens + 2  # + vision_start/end
    assert result.finish.completion_tokens >= 1


def test_image_changes_the_answer(engine):
    _, a = greedy(engine, [ChatTurn("user", [red(), "What colour?"])], max_tokens=8)
    _, b = greedy(engine, [ChatTurn("user", [Image.effect_noise((96, 64), 80).convert("RGB"), "What colour?"])],
                  max_tokens=8)
    assert a.text != b.text  # the vision tower's output reaches the language model


def test_several_images_and_turns(engine):
    turns = [
        ChatTurn("system", ["You compare pictures."]),
        ChatTurn("user", [red(), blue(), "Which one is red?"]),
        ChatTurn("assistant", ["The first one."]),
        ChatTurn("user", [red((56, 56)), "And this one?"]),
    ]
    prompt, result = greedy(engine, turns)
    assert prompt.image_count == 3
    assert prompt.arrays["image_grid_thw"].shape == (3, 3)
    assert prompt.text.count("<|vision_start|>") == 3
    assert prompt.text.index("You compare pictures.") < prompt.text.index("The first one.")
    assert result.finish.completion_tokens >= 1


def test_greedy_is_deterministic(engine):
    turns = [ChatTurn("user", [red(), "Describe."])]
    assert greedy(engine, turns)[1].text == greedy(engine, turns)[1].text


def test_same_seed_same_sample(engine):
    prompt = engine.build_prompt([ChatTurn("user", ["Tell me a story."])])

    def sample(seed):
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=seed)
        return engine.generate(prompt, params).text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1  # sampling really samples


def test_max_tokens_gives_length(engine):
    prompt = engine.build_prompt([ChatTurn("user", ["Talk."])])
    result = engine.generate(prompt, SamplingParams(max_tokens=3, temperature=1.0, top_k=0, top_p=1.0,
                                                            seed=3, repetition_penalty=1.0))
    if result.finish.finish_reason == "length":
        assert result.finish.completion_tokens == 3
    else:  # the random model may end early with <|im_end|>
        assert result.finish.completion_tokens <= 3


def test_stop_sequence_cuts_the_answer(engine):
    prompt = engine.build_prompt([ChatTurn("user", [red(), "Describe this image."])])
    full = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0)).text
    assert len(full) > 6
    stop = full[3:6]
    cut = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop]))
    assert cut.text == full[:full.index(stop)]
    assert cut.finish.finish_reason == "stop"


def test_stream_yields_deltas_then_finished(engine):
    prompt = engine.build_prompt([ChatTurn("user", ["Count to ten."])])
    params = SamplingParams(max_tokens=20, temperature=0)
    events = list(engine.stream(prompt, params))
    assert isinstance(events[-1], Finished)
    deltas = [e for e in events if isinstance(e, str)]
    assert len(deltas) > 1
    whole = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0))
    assert "".join(deltas) == whole.text


def test_closing_a_stream_cancels_generation(engine):
    prompt = engine.build_prompt([ChatTurn("user", ["Go on forever."])])
    stream = engine.stream(prompt, SamplingParams(max_tokens=2000, temperature=1.0, top_k=0, seed=1))
    next(stream)
    stream.close()
    # the worker is free again: a new request completes quickly instead of queueing behind 2000 tokens
    result = engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0))
    assert result.finish.completion_tokens <= 2
