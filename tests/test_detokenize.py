"""Incremental detokenization: characters split over tokens, stop strings, the final flush."""

from serving.engines.builtin.detokenize import IncrementalText


def ids_of(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_deltas_add_up_to_the_text(engine):
    text = "Hello 龍 world, the cat sat."
    ids = ids_of(engine, text)
    assert len(ids) > len(text.split())  # some characters take several byte-level tokens
    d = IncrementalText(engine.tokenizer)
    assert "".join(d.add(i) for i in ids) + d.finish() == text


def test_an_unfinished_character_at_the_end_is_still_released(engine):
    ids = ids_of(engine, "龍")[:-1]  # generation stopped inside a multi-byte character
    d = IncrementalText(engine.tokenizer)
    assert [d.add(i) for i in ids] == [""] * len(ids)
    assert d.finish() == engine.tokenizer.decode(ids, skip_special_tokens=True) != ""


def test_stop_string_split_over_tokens(engine):
    ids = ids_of(engine, "one two STOP three")
    d = IncrementalText(engine.tokenizer, ["STOP"])
    out = "".join(d.add(i) for i in ids) + d.finish()
    assert out == "one two " and d.stopped
