"""Qwen2's real tokenizer (151,643 byte-level BPE ranks + 22 added tokens), rebuilt offline.

No tokenizer can be downloaded on the machines this project is built and tested on, but the pinned
PyPI package `dashscope==2.0.2` ships Qwen's ranks as `dashscope/resources/qwen.tiktoken` (one line
per token: base64 bytes and rank; the base vocabulary of Qwen2 and Qwen2.5). From it this module
writes the files a Qwen2.5-VL checkpoint carries (tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json) so that the ids are Qwen2's published ones ("Hello" 9707, " world" 1879).

The recipe (deterministic, the same as transformers' TikTokenConverter in effect):
- vocab: each token's bytes spelled through GPT-2's bytes-to-unicode map, id = rank;
- merges: one per multi-byte token, found by running BPE on its own bytes with only lower ranks
  allowed -- it ends in exactly two pieces, and merging them is the token's merge, at its rank;
- NFC normaliser; Qwen2's split regex, then ByteLevel without its own regex; ByteLevel decoder;
- the 22 added tokens at 151643-151664 in the published order (Qwen2.5-VL's tokenizer_config.json).
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

RANKS_PACKAGE = "dashscope"  # pinned in requirements-dev.txt (bash build_env.sh --dev)
RANKS_FILE = ("resources", "qwen.tiktoken")
BASE_VOCAB_SIZE = 151643

# Qwen2.5-VL's added tokens, ids 151643.. in the published order, and whether each is "special"
# (skipped when decoding with skip_special_tokens): tokenizer_config.json's added_tokens_decoder.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the published checkpoints).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class RanksUnavailable(RuntimeError):
    """The package that ships Qwen's ranks is not installed."""


def ranks_path() -> Path:
    """Where the installed dashscope package keeps qwen.tiktoken (found without importing the package,
    whose import pulls in its HTTP clients)."""
    spec = importlib.util.find_spec(RANKS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RanksUnavailable(
            f"the real Qwen vocabulary is read from the '{RANKS_PACKAGE}' package, which is not installed: "
            "bash build_env.sh --dev (or pip install dashscope==2.0.2)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*RANKS_FILE)
    if not path.is_file():
        raise RanksUnavailable(f"{path} is missing: reinstall {RANKS_PACKAGE} as pinned in requirements-dev.txt")
    return path


def read_ranks(path: Path | None = None) -> dict:
    """{token bytes: rank} from a .tiktoken file."""
    ranks = {}
    for line in (path or ranks_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != BASE_VOCAB_SIZE or sorted(ranks.values()) != list(range(BASE_VOCAB_SIZE)):
        raise ValueError(f"unexpected ranks file: {len(ranks)} tokens, expected ranks 0..{BASE_VOCAB_SIZE - 1}")
    return ranks


def bytes_to_unicode() -> dict:
    """GPT-2's map from each byte to a printable character (byte-level BPE spells tokens with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values, chars = list(printable), list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(byte_values, chars)}


def token_merge(token: bytes, rank: int, ranks: dict) -> tuple:
    """The two pieces BPE joins last to make `token`: BPE on its bytes with only lower ranks allowed."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) does not end in two pieces under BPE: {parts}")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict) -> tuple:
    """(vocab {spelled token: id}, merges [(left, right)] in rank order), spelled with bytes_to_unicode."""
    spell_byte = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(spell_byte[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = token_merge(token, rank, ranks)
            merges.append((spell(left), spell(right)))
    return vocab, merges


def build_tokenizer(ranks: dict | None = None):
    """The tokenizers.Tokenizer of Qwen2 / Qwen2.5(-VL): BPE from the ranks plus the added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = vocab_and_merges(ranks if ranks is not None else read_ranks())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False,
                               fuse_unk=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # one at a time, so each gets the next id in the published order whatever its "special" flag
    for content, special in ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    return tok


def write_tokenizer_files(folder: Path, chat_template: str, ranks: dict | None = None) -> dict:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json as the published checkpoint ships
    them; returns {added token: id}."""
    folder = Path(folder)
    tok = build_tokenizer(ranks)
    tok.save(str(folder / "tokenizer.json"))
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    _write_json(folder / "vocab.json", saved["model"]["vocab"])
    lines = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in saved["model"]["merges"]]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = {content: BASE_VOCAB_SIZE + n for n, (content, _special) in enumerate(ADDED_TOKENS)}
    for content, expected in ids.items():
        if tok.token_to_id(content) != expected:
            raise ValueError(f"{content} got id {tok.token_to_id(content)}, published id {expected}")
    _write_json(folder / "tokenizer_config.json", tokenizer_config(chat_template))
    return ids


def tokenizer_config(chat_template: str) -> dict:
    """Qwen2.5-VL's published tokenizer_config.json."""
    added = {
        str(BASE_VOCAB_SIZE + n): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": special}
        for n, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
