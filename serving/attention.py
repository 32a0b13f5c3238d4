"""Grouped-query attention without copying K/V, for the language model our engine drives.

PaddleFormers' eager attention repeats each K/V head for every query head of its group
(`repeat_kv`: an expand and a copy of the whole cache, every layer, every step); profiled on
`demo-bench` at 8 rows it was about a third of a decoding step. Here the query heads of a
group are laid side by side instead, so one matmul per K/V head reads the cache once:
query [b, kv_heads, group * q_len, d] x key^T [b, kv_heads, d, L]. Same maths as eager
(scores scaled after the matmul, softmax in float32), so greedy tokens stay the same (tested).

Installed per model instance by serving.engine (the text config's `_attn_implementation`);
the vision tower and any other model in the process keep PaddleFormers' own attention.
"""

from __future__ import annotations

NAME = "grouped_eager"


def grouped_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """query [b, heads, q, d], key/value [b, kv_heads, L, d] -> ([b, q, heads * d], weights)."""
    import paddle
    import paddle.nn.functional as F

    b, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    # repeat_kv orders heads kv-major (head = kv * group + j), so this reshape pairs each head with its K/V
    scores = paddle.matmul(query.reshape([b, kv_heads, group * q_len, dim]), key, transpose_y=True) * scaling
    scores = scores.reshape([b, kv_heads, group, q_len, length])
    if attention_mask is None and q_len > 1:  # a non-eager name gets no mask when nothing is padded: causal here
        attention_mask = _causal_mask(q_len, length, query.dtype)
    if attention_mask is not None:  # [b or 1, 1, q, >= L]
        scores = scores + attention_mask[:, :, :, :length].unsqueeze(2)
    weights = F.softmax(scores, axis=-1, dtype=paddle.float32).astype(query.dtype)
    out = paddle.matmul(weights.reshape([b, kv_heads, group * q_len, length]), value)
    out = out.reshape([b, heads, q_len, dim]).transpose([0, 2, 1, 3]).reshape([b, q_len, heads * dim])
    return out, weights


def _causal_mask(q_len: int, length: int, dtype):
    """[1, 1, q, L]: the queries are the last q of L positions; each sees itself and what came before."""
    import paddle

    future = paddle.triu(paddle.ones([q_len, length], dtype="bool"), diagonal=length - q_len + 1)
    return paddle.where(future, paddle.finfo(dtype).min, 0.0).astype(dtype).reshape([1, 1, q_len, length])


def install(model) -> None:
    """Make this model's language model (only) use grouped_attention."""
    from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS[NAME] = grouped_attention
    use(model, NAME)


def use(model, name: str) -> str:
    """Set the language model's attention implementation by name; returns the previous one (for tests
    that compare with PaddleFormers' own "eager")."""
    language_model = model.model.language_model
    configs = {id(layer.self_attn.config): layer.self_attn.config for layer in language_model.layers}
    configs[id(language_model.config)] = language_model.config
    previous = language_model.config._attn_implementation
    for config in configs.values():
        config._attn_implementation = name
    return previous
