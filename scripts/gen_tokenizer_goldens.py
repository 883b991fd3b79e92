#!/usr/bin/env python3
"""Writes the tokenizer goldens in tests/engine/tokenizer/testdata/.

Builds a small byte-level BPE vocabulary with real merges, encodes a fixed list of tricky strings
plus random ones (fixed seed) with tiktoken's Encoding and the ORIGINAL Kimi K2 `pat_str`, through
the same wrapper as the reference `TikTokenTokenizer.encode(text, allow_special_tokens=False)`
(tokenization_kimi.py: 400,000-code-point chunks, runs of more than 25,000 whitespace /
non-whitespace code points split), and writes:

  testdata/tiktoken.model         the vocabulary ("base64token rank" lines)
  testdata/tokenizer_config.json  the Kimi special-token table for it
  testdata/goldens.json           {"pat_str", "num_ranks", "cases": [{"name", text, ids}], "chat"}

A case's text is "text", or "repeat": [[unit, count], ...] (concatenated) for long inputs; its ids
are "ids", or "ids_rle": [[id, count], ...]. The C++ test (tokenizer_golden_test.cc) must reproduce
every id. Needs `pip install tiktoken` (0.14.0 was used). Not run by the build: the output is
checked in. Usage: scripts/gen_tokenizer_goldens.py [--out DIR]
"""

import argparse
import base64
import collections
import json
import os
import random
import re
import sys

import tiktoken

# tokenization_kimi.py, KIMI_LINEAR.md §7 — keep byte-identical to kKimiPatternTiktoken.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_SPECIAL_SLOTS = 256
NAMED_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
    17: "<|im_middle|>", 18: "<|media_begin|>", 19: "<|media_content|>", 20: "<|media_end|>",
    21: "<|media_pad|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}

CORPUS = """
The quick brown fox jumps over the lazy dog. They'll say it's the thing they're doing, and I'M
sure we've done the same. Don't stop: the tokenizer is running, the model is thinking, the
server is streaming tokens to the client. In 2025 the number 1234567 was written 1,234,567.00 and
3.14159 is pi. def encode(self, text): return [self.rank[b] for b in text.encode('utf-8')]
for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }  // inner product
中文分词是自然语言处理的基础任务。我们今天学习中文，你好世界！机器学习和深度学习正在改变世界。
日本語のテキストも少し含めます。カタカナとひらがなです。한국어 문장도 있습니다.
Привет, мир! Это тест токенизатора. Γειά σου κόσμε. café naïve résumé coöperate Ǆemal.
नमस्ते दुनिया। مرحبا بالعالم. สวัสดีชาวโลก 😀😃😄 👍🏽 👨‍👩‍👧 ❤️ 🇯🇵
    indented code with four spaces
\tand a tab\r\nand windows newlines\r\n\r\n
the the the thing things thinking throughout together tomorrow
"""

# Tokens added after training (with every prefix, so BPE can reach them by merging).
EXTRA_TOKENS = (
    [" the", "ing", "th", "中文", "你好", "世界", "ab", " ab", "'s", "'ll", "'re", "\r\n", "\n\n",
     "    ", "\t\t", "😀", " 😀", "é", " é", "<|", "|>", " <|", "im", "_end", "[BOS]", "  \n",
     "...", " ...", "ſ", "ー", "。", "、"]
    # Tokens that straddle pre-token boundaries: they only appear if the split is wrong, so they
    # make the ids sensitive to each regex subtlety (Script vs Script_Extensions for Han, U+180E
    # not being whitespace, contractions, digit groups of three, case classes, lookahead).
    + ["中文。", "文。", "、中", "中\u0301", "!\u180e!", "\u180e", "a\u180e", "I'M", "y'll",
       "t'ſ", "1234", "!\n", "oW", " \u3000", "\u00a0\u00a0", "a\u00a0", "x \u180e", "   y",
       "a中", " 中", "B中"]
    + ["%d" % d for d in range(10)]
    + ["%02d" % d for d in range(100)]
    + ["123", "000", "999"]
    + ["a" * k for k in (2, 4, 8, 16)]
    + [" " * k for k in (2, 4, 8, 16)]
)
# Tokens added without their prefixes: reachable only as a whole pre-token (tiktoken's direct
# lookup) or by a lucky concatenation during BPE.
UNREACHABLE_TOKENS = ["xyzzy", " Kimi", "🇯🇵", "Ǆemal"]


def simple_pieces(text):
    # Training only shapes the vocabulary; any reasonable split will do.
    return re.findall(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|\s+", text)


def train_bpe(text, num_merges):
    words = collections.Counter(tuple(bytes([b]) for b in p.encode()) for p in simple_pieces(text))
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        new_words = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return vocab, known


def build_vocab():
    vocab, known = train_bpe(CORPUS, 500)
    for tok in EXTRA_TOKENS:
        b = tok.encode()
        for k in range(2, len(b) + 1):
            if b[:k] not in known:
                known.add(b[:k])
                vocab.append(b[:k])
    for tok in UNREACHABLE_TOKENS:
        b = tok.encode()
        if b not in known:
            known.add(b)
            vocab.append(b)
    # Single bytes get a shuffled order of ranks (as real vocabularies do), so nothing may assume
    # rank == byte value.
    rng = random.Random(1234)
    singles = vocab[:256]
    rng.shuffle(singles)
    ordered = singles + vocab[256:]
    return {tok: rank for rank, tok in enumerate(ordered)}


def is_space_py(c):
    return c.isspace()


def split_whitespaces_or_nonwhitespaces(s, max_len):
    # Copy of TikTokenTokenizer._split_whitespaces_or_nonwhitespaces.
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def kimi_encode(enc, text):
    # TikTokenTokenizer.encode(text, allow_special_tokens=False).
    ids = []
    for i in range(0, len(text), 400_000):
        for sub in split_whitespaces_or_nonwhitespaces(text[i:i + 400_000], 25_000):
            ids.extend(enc.encode(sub, disallowed_special=()))
    return ids


FIXED = [
    "", "a", " ", "  ", "\n", "\r\n", "\t", "hello", "Hello world", " hello  world ",
    "the thing is thinking", "I'M here", "they'll", "THEY'LL", "you're", "We've", "she'd", "it'S",
    "don't", "ain'T", "'s", "''s", "x's'", "o'clock", "Rock'n'roll", "'ll'll", "can'ſ", "it'ſ",
    "1", "12", "123", "1234", "1234567", "3.14159", "1,234,567.00", "٣٤٥٦", "１２３４", "²³",
    "Ⅻ and ① ② ③", "12abc34", "abc123def",
    "中文", "你好，世界！", "中文。", "「中文」", "々〆〇", "日本語のテキスト", "カタカナー", "中a文b",
    "中\u0301", "\U00020000\U0002A6D6 ext-B", "한국어 문장", "Привет, мир!", "Γειά σου",
    "café", "cafe\u0301", "e\u0301\u0301\u0301", " \u0301x", "naïve résumé", "ǅemal Ǆ ǆ", "ʰʲ",
    "नमस्ते", "مرحبا بالعالم", "สวัสดีชาวโลก",
    "😀", "😀😃😄", " 😀", "👍🏽", "👨‍👩‍👧", "❤️", "🇯🇵🇺🇸", "a😀b",
    "hello\n\nworld", "a  \n  b", "a \n", "x   ", "x   y", "\n\n\n", " \n \n ", "\r\n\r\n",
    "\t\tindented", "    four", "line1\r\nline2\r\n", "trailing spaces   \n", "a\u00a0b",
    "a\u3000b", "a\u2028b", "a\u0085b", "a\u180eb", "a\u180e b", "\u180e", "a\u200bb", "a\x0bb",
    "a\x0cb", "a\x1cb", "a \x1c b", "\ufeffBOM", "\ue000\uf8ff", "\ufffd",
    "<|im_end|>", "[BOS]", "<|im_user|>hi<|im_end|>", "<think>x</think>", "[EOS] [PAD]",
    "!!!", "...", " ...", "?!\n", "—“quoted”—", "«ciao»", "(a)[b]{c}", "$100 €5 #1 @me",
    "foo_bar", "snake_case_name", "`code`", "a->b", "x:=1;", "http://example.com/a?b=c&d=e",
    "。中文。", "a中b文c", "Ab中", " 中文", "中文、中文", "!\u180e!", "x \u180e y", "x\u00a0\u00a0y", "x   y", "HelloWORLD",
    "xyzzy", " xyzzy", "xyzzyx", " Kimi", "Kimi", "Ǆemal", "aaaaaaaaaaaaaaaa", "a" * 37,
    " " * 17 + "x", "ab ab ab", "0000000000", "9999",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += i;\n}\n",
]

# Long inputs that hit the heap BPE path (pieces >= 256 bytes) and the reference's splits.
REPEATS = [
    ("long_letters", [["a", 300]]),
    ("long_emoji", [["😀", 100]]),
    ("long_mixed_punct", [["!?.,;:-", 60]]),
    ("long_cjk", [["中文你好世界", 80]]),
    ("long_spaces", [[" ", 400], ["x", 1]]),
    ("run_25000_letters", [["a", 25000]]),
    ("run_25001_letters", [["a", 25001]]),
    ("run_60001_letters", [["a", 60001], [" b", 3]]),
    ("run_25001_spaces", [[" ", 25001], ["x", 1]]),
    ("run_30000_newlines", [["\n", 30000]]),
    ("chunk_400k", [["ab ", 140_000]]),
]


def random_text(rng):
    words = ["the", "thing", "tokenizer", "Kimi", "model", "server", "hello", "world", "I", "you",
             "they", "data", "ing", "xyzzy", "ab", "café", "naïve"]
    contractions = ["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'LL", "'d", "'ſ", "'x", "'"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "\u00a0", "\u3000", "\u2028",
              "\u0085", "\u180e", "\u200b", "\x0b", "\x0c", "\x1c", "    "]
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + [
        "...", "—", "“", "”", "«", "»", "<|im_end|>", "[BOS]", "<think>", "€", "。", "、", "「",
        "」", "々", "ー", "\ufeff", "\ue000", "\ufffd"]
    pools = [
        lambda: rng.choice(words),
        lambda: rng.choice(words).upper(),
        lambda: rng.choice(words).title(),
        lambda: rng.choice(words) + rng.choice(contractions),
        lambda: rng.choice(spaces),
        lambda: rng.choice(punct),
        lambda: "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8))),
        lambda: "".join(chr(rng.choice([0xFF10, 0x0660, 0x00B2, 0x2160, 0x2460]) + rng.randint(0, 9))
                        for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x3041, 0x30FA)) for _ in range(rng.randint(1, 5))),
        lambda: "".join(chr(rng.randint(0xAC00, 0xD7A3)) for _ in range(rng.randint(1, 4))),
        lambda: "".join(chr(rng.randint(0x0410, 0x044F)) for _ in range(rng.randint(1, 7))),
        lambda: "".join(chr(rng.randint(0x0391, 0x03A9)) for _ in range(rng.randint(1, 5))),
        lambda: rng.choice("aeiouAEIOU") + "".join(
            chr(rng.randint(0x0300, 0x036F)) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(["नमस्ते", "مرحبا", "สวัสดี", "ǅ", "ʰ", "Ǆemal", "ß", "İstanbul", "ﬁ"]),
        lambda: "".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 4))),
        lambda: rng.choice(["👍🏽", "👨‍👩‍👧", "❤️", "🇯🇵", "\U00020001", "\U0002A6D0"]),
    ]
    n = rng.randint(1, 24)
    return "".join(rng.choice(pools)() for _ in range(n))


CHAT_MESSAGES = [
    {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
    {"role": "user", "content": "Hello! 你好。What's 2+2?\n\nAnswer briefly."},
    {"role": "assistant", "content": "4.\n"},
    {"role": "tool", "name": "calculator", "content": '{"result": 4}'},
    {"role": "tool", "content": "ok"},
]


def render_chat_text(messages, add_generation_prompt):
    # The K2-family template as text (KIMI_LINEAR.md §7); the reference encodes it with special
    # tokens allowed, which is what RenderChat reproduces from ids.
    parts = []
    for m in messages:
        if m["role"] == "tool":
            parts.append("<|im_system|>%s<|im_middle|>%s<|im_end|>" % (m.get("name") or "tool",
                                                                       m["content"]))
        else:
            opener = {"system": "<|im_system|>", "user": "<|im_user|>",
                      "assistant": "<|im_assistant|>"}[m["role"]]
            parts.append("%s%s<|im_middle|>%s<|im_end|>" % (opener, m["role"], m["content"]))
    if add_generation_prompt:
        parts.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(parts)


def rle(ids):
    out = []
    for t in ids:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return out


def main():
    parser = argparse.ArgumentParser()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out", default=os.path.join(root, "tests/engine/tokenizer/testdata"))
    parser.add_argument("--num_random", type=int, default=300)
    args = parser.parse_args()

    ranks = build_vocab()
    n = len(ranks)
    specials = {NAMED_SPECIALS.get(s, "<|reserved_token_%d|>" % (n + s)): n + s
                for s in range(NUM_SPECIAL_SLOTS)}
    enc = tiktoken.Encoding(name="kls_golden", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens=specials)

    cases = []

    def add(name, text, repeat=None):
        ids = kimi_encode(enc, text)
        assert enc.decode_bytes(ids) == text.encode("utf-8"), name
        case = {"name": name}
        if repeat is None:
            case["text"] = text
        else:
            case["repeat"] = repeat
        runs = rle(ids)
        if len(runs) * 2 < len(ids):
            case["ids_rle"] = runs
        else:
            case["ids"] = ids
        cases.append(case)

    for i, text in enumerate(FIXED):
        add("fixed_%d" % i, text)
    for name, repeat in REPEATS:
        add(name, "".join(unit * count for unit, count in repeat), repeat)
    rng = random.Random(20250101)
    for i in range(args.num_random):
        add("random_%d" % i, random_text(rng))

    chat = {"messages": CHAT_MESSAGES, "add_generation_prompt": True,
            "ids": enc.encode(render_chat_text(CHAT_MESSAGES, True), allowed_special="all")}

    os.makedirs(args.out, exist_ok=True)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    with open(os.path.join(args.out, "tiktoken.model"), "w", newline="\n") as f:
        for tok, rank in by_rank:
            f.write("%s %d\n" % (base64.b64encode(tok).decode("ascii"), rank))
    config = {
        "added_tokens_decoder": {
            str(n + s): {"content": NAMED_SPECIALS.get(s, "<|reserved_token_%d|>" % (n + s)),
                         "special": True}
            for s in range(NUM_SPECIAL_SLOTS)
        },
        "bos_token": "[BOS]",
        "eos_token": {"__type": "AddedToken", "content": "[EOS]"},
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", newline="\n") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "goldens.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write('{"generator": "scripts/gen_tokenizer_goldens.py", "tiktoken": %s,\n' %
                json.dumps(tiktoken.__version__))
        f.write(' "pat_str": %s,\n "num_ranks": %d,\n "cases": [\n' %
                (json.dumps(PAT_STR), n))
        f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":"))
                           for c in cases))
        f.write("\n],\n \"chat\": %s}\n" % json.dumps(chat, ensure_ascii=False,
                                                       separators=(",", ":")))
    print("wrote %d cases, %d ranks to %s" % (len(cases), n, args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
