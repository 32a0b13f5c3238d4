"""At the real vocabulary (demo-vocab: Qwen's own tokenizer, 151,936 tokens, the published checkpoint form):
known ids and exact round trips, characters split over several byte-level tokens in streamed deltas, stop
strings and logprobs, the tool-call tokens, and the published form loading and serving on a CPU."""

from __future__ import annotations

import codecs
import json
import struct

import numpy as np
import pytest

from serving.engines.builtin.detokenize import IncrementalText
from serving.engines.builtin.sampling import token_names
from serving.model import published, qwen_tokenizer
from serving.model.demo import demo_path

CHAT = "/v1/chat/completions"
CHINESE = "请用中文写一首关于秋天的诗，要有月亮、桂花和远方的朋友。"


def ids_of(engine, text):
    return engine.encode(text)


# ------------------------------------------------------------------ the tokenizer

KNOWN_IDS = [  # Qwen2's published ids
    ("Hello", [9707]), (" world", [1879]), (",", [11]), ("user", [872]), ("\n", [198]), ("!", [0]),
    ("Hello, world!", [9707, 11, 1879, 0]), ("你好", [108386]),
    ("<tool_call>", [151657]), ("</tool_call>", [151658]), ("<|im_start|>", [151644]), ("<|im_end|>", [151645]),
    ("<|endoftext|>", [151643]), ("<|image_pad|>", [151655]), ("<|file_sep|>", [151664]),
    # the start of Qwen2.5-VL's chat template, as Qwen's own tokenizer encodes it
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
     [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652]),
]


@pytest.mark.parametrize("text,ids", KNOWN_IDS, ids=[repr(t)[:40] for t, _ in KNOWN_IDS])
def test_known_ids(vocab_engine, text, ids):
    assert ids_of(vocab_engine, text) == ids


def test_added_tokens_in_the_published_order(vocab_engine):
    tok = vocab_engine.tokenizer
    for n, (content, special) in enumerate(qwen_tokenizer.ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(content) == 151643 + n
    assert len(tok) == 151665
    config = json.loads((demo_path("demo-vocab") / "config.json").read_text())
    assert config["vocab_size"] == 151936 and vocab_engine.model.config.vocab_size == 151936


ROUND_TRIPS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?  Two  spaces\tand a tab.\n\nNew line.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。龘靐齉爩",  # common and very rare characters
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇨🇳 🫠 ❤️",  # skin tone, ZWJ family, flag, new emoji, variation selector
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n"
    "</tool_call><|im_end|>",
    "Mixed 中文 and English, 日本語のテキスト, 한국어, Ελληνικά, русский, العربية, עברית, हिन्दी.",
    "code: def f(x):\n    return x ** 2  # ½ · € — “quotes”\r\n",
]


@pytest.mark.parametrize("text", ROUND_TRIPS, ids=["english", "chinese", "emoji", "chat markup", "scripts", "code"])
def test_exact_round_trip(vocab_engine, text):
    ids = ids_of(vocab_engine, text)
    assert vocab_engine.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < 151665 for i in ids)


def test_nfc_normalisation_as_published(vocab_engine):
    """Qwen2's tokenizer normalises to NFC: a decomposed é encodes as the composed one."""
    assert ids_of(vocab_engine, "caf\u0065\u0301") == ids_of(vocab_engine, "caf\u00e9")


def test_build_is_deterministic(tmp_path):
    """The tokenizer files are rebuilt byte for byte from the pinned package's ranks."""
    qwen_tokenizer.write_tokenizer_files(tmp_path, "template")
    folder = demo_path("demo-vocab")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(merges) == 1 + 151643 - 256  # the header, then one merge per multi-byte token


# ------------------------------------------------------------------ the published form on a CPU

def test_published_form_on_disk():
    folder = demo_path("demo-vocab")
    config = json.loads((folder / "config.json").read_text())
    assert "fuse_rms_norm" not in json.dumps(config) and "text_config" not in config
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == published.PUBLISHED_GENERATION_CONFIG
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                          "model-00002-of-00002.safetensors"]
    dtypes = set()
    for shard in set(index["weight_map"].values()):
        with open(folder / shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16"}


def test_loaded_on_cpu_in_float32_with_unfused_norms(vocab_engine):
    """auto on a CPU is float32 whatever torch_dtype says; every RMSNorm reads fuse_rms_norm false from its
    config although config.json does not carry it; the bf16 weights arrive exactly."""
    from paddleformers.nn.norm import RMSNorm

    loaded = vocab_engine.loaded
    assert loaded.device == "cpu" and loaded.dtype == "float32"
    norms = [layer for layer in vocab_engine.model.sublayers() if isinstance(layer, RMSNorm)]
    assert norms and all(layer.config.get("fuse_rms_norm", True) is False for layer in norms)
    config = vocab_engine.model.config
    assert config.fuse_rms_norm is False and config.vision_config.fuse_rms_norm is False
    assert config.text_config.fuse_rms_norm is False
    embed = vocab_engine.model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
    scale = published.SCALES["vocab"]
    first = next(published._random_chunks("model.embed_tokens.weight", (151936, scale.hidden_size),
                                          scale.weight_std))
    expected = (published.to_bf16(first).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(embed.reshape(-1)[:expected.size], expected)


def test_the_library_code_answers_too(vocab_engine):
    """The library's own norms and attention (as the tutorial's baseline server runs them) work on the
    published form on a CPU, and give the engine's greedy tokens."""
    from serving.engines.builtin import speedups
    from serving.jobs import SamplingParams
    from serving.protocol import ChatTurn

    prompt = vocab_engine.build_prompt([ChatTurn("user", [CHINESE])])
    params = dict(max_tokens=8, temperature=0, repetition_penalty=1.0)
    ours = vocab_engine.generate(prompt, SamplingParams(**params)).text
    with speedups.library_code(vocab_engine.model):
        assert vocab_engine.generate(prompt, SamplingParams(**params)).text == ours


def test_a_dtype_the_cpu_cannot_compute_in_is_refused():
    from serving.model.loader import ModelLoadError, choose_dtype

    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ModelLoadError) as info:
            choose_dtype("cpu", dtype)
        message = str(info.value)
        assert "\n" not in message and f"--dtype {dtype} cannot run on cpu" in message and "float32" in message
    assert choose_dtype("cpu", "auto") == "float32" == choose_dtype("cpu", "float32")


def test_bfloat16_on_a_cpu_is_one_line_and_exit_2():
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    demo_path("demo-vocab")  # built already: the refusal comes before any loading
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DTYPE", "PORT", "BACKEND")}
    done = subprocess.run([sys.executable, "api.py", "--model", "demo-vocab", "--dtype", "bfloat16", "--port",
                           str(free_port()), "--host", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--dtype bfloat16 cannot run on cpu" in done.stderr and "Traceback" not in done.stderr


def test_an_engine_that_cannot_generate_never_reports_ready(vocab_engine):
    """The warm-up meets the real failure of a fused norm on a CPU (the library's code, fused_rms_norm on)."""
    from serving.engines.builtin import speedups
    from serving.model import paddle_fixes
    from serving.model.loader import ModelLoadError

    configs = paddle_fixes.use_device_kernels(vocab_engine.model, "cpu")
    probe = type(vocab_engine).__new__(type(vocab_engine))  # the engine's warm-up, without closing the shared one
    probe.__dict__.update(vocab_engine.__dict__, close=lambda timeout=None: None)
    try:
        for c in configs:
            c.fuse_rms_norm = True  # what PaddleFormers does with a published config.json left alone
        with speedups.library_code(vocab_engine.model), pytest.raises(ModelLoadError) as info:
            probe.warm_up()
    finally:
        paddle_fixes.use_device_kernels(vocab_engine.model, "cpu")
    assert "cannot generate on cpu as float32" in str(info.value) and "fused_rms_norm" in str(info.value)
    assert vocab_engine.health() == (True, "ok")


# ------------------------------------------------------------------ characters split over tokens

def byte_pieces(engine, ids):
    names = token_names(engine.tokenizer)
    return [names(i)[1] for i in ids]


def characters_across_tokens(pieces) -> list:
    """The characters whose UTF-8 bytes start in one token and end in a later one (U+FFFD excluded)."""
    boundaries, at = set(), 0
    for piece in pieces[:-1]:
        at += len(piece)
        boundaries.add(at)
    decoder, start, found = codecs.getincrementaldecoder("utf-8")("replace"), 0, []
    data = b"".join(pieces)
    for end in range(1, len(data) + 1):
        out = decoder.decode(data[end - 1:end])
        if out:
            if out != "\ufffd" and any(start < b < end for b in boundaries):
                found.append((out, start, end))
            start = end
    return found


def test_deltas_never_split_a_character(vocab_engine):
    text = "龘靐齉爩 🫠🪿 价格是一百元，谢谢！"
    ids = ids_of(vocab_engine, text)
    assert len(characters_across_tokens(byte_pieces(vocab_engine, ids))) >= 4  # the case this test is about
    d = IncrementalText(vocab_engine.tokenizer)
    deltas = [d.add(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_stop_string_ending_in_a_character_split_over_tokens(vocab_engine):
    text = "先说价格：一百元，龘然后再说别的。"
    ids = ids_of(vocab_engine, text)
    assert any(ch == "龘" for ch, _, _ in characters_across_tokens(byte_pieces(vocab_engine, ids)))
    d = IncrementalText(vocab_engine.tokenizer, ["，龘"])
    deltas = [d.add(i) for i in ids] + [d.finish()]
    assert "".join(deltas) == "先说价格：一百元" and d.stopped
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.fixture()
def generated_ids(monkeypatch):
    """The token ids the engine generates (every row's, in order), seen where the scheduler hands them to a row."""
    from serving.engines.builtin.batch import Row

    seen, original = [], Row.add

    def add(row, token, logprob=None):
        if not row.done and token not in row.eos_ids:
            seen.append(int(token))
        return original(row, token, logprob)

    monkeypatch.setattr(Row, "add", add)
    return seen


def ask(client, **extra):
    body = {"messages": [{"role": "user", "content": CHINESE}], "max_tokens": 48, "temperature": 1.0,
            "top_p": 1.0, "seed": 7, **extra}
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.json
    if not body.get("stream"):
        return r.json["choices"][0]
    deltas, logprobs, finish = [], [], None
    for line in r.get_data(as_text=True).splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                deltas.append(choice["delta"]["content"])
            logprobs += (choice.get("logprobs") or {}).get("content") or []
            finish = choice.get("finish_reason") or finish
    return deltas, logprobs, finish


def test_seeded_chinese_stream_equals_the_answer(vocab_engine, vocab_client, generated_ids):
    """Sampling wanders over the whole vocabulary: Chinese, other scripts and byte pieces of characters. The
    streamed deltas add up to the non-streamed answer, which is the whole answer's decoding; no delta carries a
    replacement character the whole answer does not have (a character split between two deltas would)."""
    answer = ask(vocab_client)
    text, ids = answer["message"]["content"], list(generated_ids)
    pieces = byte_pieces(vocab_engine, ids)
    assert len(ids) == 48 and b"".join(pieces).decode("utf-8", errors="replace") == text
    assert characters_across_tokens(pieces), "the sampled answer should hold characters split over tokens"
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # CJK
    generated_ids.clear()
    deltas, _, finish = ask(vocab_client, stream=True)
    assert generated_ids == ids and "".join(deltas) == text and finish == answer["finish_reason"] == "length"
    assert sum(delta.count("\ufffd") for delta in deltas) == text.count("\ufffd")


def test_seeded_stop_string_ending_inside_a_split_character(vocab_engine, vocab_client, generated_ids):
    """A stop string whose last character only appears once its last byte-level token arrives: the answer ends
    right before it, streamed or not, and none of its bytes leak."""
    text = ask(vocab_client)["message"]["content"]
    pieces = byte_pieces(vocab_engine, list(generated_ids))
    ch, start, _end = characters_across_tokens(pieces)[0]
    before = b"".join(pieces)[:start].decode("utf-8", errors="replace")
    stop = before[-1:] + ch  # the character before it and the split character
    expected = before[:-1]
    assert text.index(stop) == len(expected)
    stopped = ask(vocab_client, stop=[stop])
    assert stopped["message"]["content"] == expected and stopped["finish_reason"] == "stop"
    deltas, _, finish = ask(vocab_client, stream=True, stop=[stop])
    assert "".join(deltas) == expected and finish == "stop"


def test_logprobs_name_tokens_at_the_real_vocabulary(vocab_engine, vocab_client):
    names = token_names(vocab_engine.tokenizer)
    assert names(9707) == ("Hello", b"Hello") and names(1879) == (" world", b" world")
    assert names(108386) == ("你好", "你好".encode()) and names(151657) == ("<tool_call>", b"<tool_call>")
    assert names(151645) == ("<|im_end|>", b"<|im_end|>")
    first_of_rare = ids_of(vocab_engine, "龘")[0]
    text, raw = names(first_of_rare)
    assert raw == "龘".encode()[:len(raw)] and 0 < len(raw) < 3 and text == raw.decode("utf-8", "replace")
    answer = ask(vocab_client, logprobs=True, top_logprobs=5, max_tokens=1)  # one: a full log_softmax is slow here
    assert len(answer["logprobs"]["content"]) == 1
    for entry in answer["logprobs"]["content"]:
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        tops = entry["top_logprobs"]
        assert len(tops) == 5 and [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert entry["logprob"] <= tops[0]["logprob"] + 1e-6 and all(t["logprob"] <= 0 for t in tops)
        for top in tops:
            assert top["token"] == bytes(top["bytes"]).decode("utf-8", errors="replace")


def test_tool_call_tokens_keep_their_ids_and_text(vocab_engine):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    ids = ids_of(vocab_engine, call)
    assert ids[0] == 151657 and ids[-1] == 151658
    assert vocab_engine.tokenizer.convert_ids_to_tokens([151657, 151658]) == ["<tool_call>", "</tool_call>"]
    d = IncrementalText(vocab_engine.tokenizer)
    assert "".join(d.add(i) for i in ids) + d.finish() == call  # not special: the text survives detokenising


def test_chat_completion_serves(vocab_client):
    r = vocab_client.post(CHAT, json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8})
    assert r.status_code == 200, r.json
    assert r.json["usage"]["completion_tokens"] >= 1 and r.json["model"] == "demo-vocab"


# ------------------------------------------------------------------ the 3B model, on paper

# Qwen/Qwen2.5-VL-3B-Instruct's config.json, as published on the Hugging Face hub.
PUBLISHED_3B_CONFIG_JSON = """{
  "architectures": ["Qwen2_5_VLForConditionalGeneration"],
  "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
  "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
  "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
  "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
  "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": true,
  "use_sliding_window": false,
  "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                    "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                    "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  "vocab_size": 151936
}"""


def test_3b_config_is_the_published_one_field_for_field():
    scale = published.SCALES["3b"]
    assert published.config(scale) == json.loads(PUBLISHED_3B_CONFIG_JSON)
    assert list(published.config(scale)) == list(json.loads(PUBLISHED_3B_CONFIG_JSON))  # and in its order


def test_3b_shape_and_index_on_paper():
    scale = published.SCALES["3b"]
    assert published.parameter_count(scale) == 3_754_622_976  # "3.75B params", as the model card says
    index = published.index(scale)
    assert index["metadata"]["total_size"] == 2 * 3_754_622_976  # bf16
    names = set(index["weight_map"])
    assert "lm_head.weight" not in names  # tied to the embeddings
    assert {f"model.layers.{n}.mlp.down_proj.weight" for n in range(36)} <= names
    assert {f"visual.blocks.{n}.attn.qkv.bias" for n in range(32)} <= names
    assert "model.layers.36.mlp.down_proj.weight" not in names and "visual.blocks.32.norm1.weight" not in names
    shapes = published.tensor_shapes(scale)
    assert shapes["model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 2048)
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120) and shapes["visual.merger.mlp.2.weight"] == (2048, 5120)
    sizes = {}
    for name, shard in index["weight_map"].items():
        sizes[shard] = sizes.get(shard, 0) + 2 * int(np.prod(shapes[name]))
    assert sorted(sizes) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert max(sizes.values()) < 4.2e9  # two shards of about half the 7.5 GB each
