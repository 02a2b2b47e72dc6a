"""Record transformers' beam search on the golden fixtures and on the shipped model.

    pip install -e '.[reference]'
    python tools/make_beam_references.py
    # writes tests/fixtures/<variant>/beam_reference.json and tests/data/shakespeare_beam_reference.json

For each model: two prompts x six settings of (num_beams, length_penalty,
early_stopping, num_return_sequences), each run through transformers'
`generate(num_beams=N, do_sample=False, ...)` twice:

* with its KV cache, which is what users run, and
* with `use_cache=False`: every step is then a full forward over each beam's whole
  sequence, i.e. beam search over full-forward logits, by transformers' own code.

Both run under minislm's generation policy (minislm/runtime.py), which every
beam search of minislm's applies: the ids the tokenizer has no piece for are
suppressed (`suppress_tokens`, -inf after the log-softmax, as minislm masks them),
and the stop ids are generation_config.json's plus the tokenizer's own end token.

Where the two agree, the file records that answer ("reference": "generate"). Where
they disagree, it is the cache that is wrong (tests/conftest.py lists the known
cases: a window of 1, the LongRoPE switch), and the file records the full-forward
answer ("reference": "generate(use_cache=False)") together with the cached one, so
the disagreement stays visible. The PhiMoE LongRoPE fixture's reference has its
rotary embedding switched by length, as for its other references
(`minislm.verify.phimoe_longrope_as_designed`, see tools/make_fixtures.py).

The default test suite (tests/test_beam.py) compares minislm with these files, so
it needs neither torch nor transformers.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

import minislm
from minislm.load import BUNDLED_MODEL
from minislm.runtime import allowed_ids, stop_ids
from minislm.tokenizer import load_tokenizer
from minislm.verify import phimoe_longrope_as_designed

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SHIPPED_REFERENCE = ROOT / "tests" / "data" / "shakespeare_beam_reference.json"
# (num_beams, length_penalty, early_stopping, num_return_sequences): the three early
# stopping rules, length penalties that favour short, neutral and long hypotheses.
SETTINGS = [
    (2, 1.0, False, 1),
    (3, 1.0, False, 2),
    (4, 0.5, True, 2),
    (4, 2.0, "never", 4),
    (5, -1.0, False, 1),
    (8, 1.0, False, 3),
]


def policy(folder: Path) -> dict:
    """minislm's stop ids and the ids it never chooses, as transformers' generate() arguments."""
    model = minislm.load(folder)
    return {"eos_token_id": sorted(stop_ids(model)),
            "suppress_tokens": list(range(allowed_ids(model), model.config.vocab_size))}


def transformers_beams(ref, rules: dict, prompt: list[int], max_new_tokens: int, setting, use_cache: bool) -> dict:
    """transformers' returned hypotheses: generated ids (padding cut off) and scores."""
    num_beams, length_penalty, early_stopping, num_return = setting
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return, use_cache=use_cache,
            return_dict_in_generate=True, output_scores=True, **rules,
        )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()  # generated tokens of each hypothesis
    sequences = [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]
    return {"sequences": sequences, "scores": [float(s) for s in out.sequences_scores]}


def cases_for(ref, rules: dict, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    cases = []
    for prompt in prompts:
        for setting in SETTINGS:
            cached = transformers_beams(ref, rules, prompt, max_new_tokens, setting, use_cache=True)
            full = transformers_beams(ref, rules, prompt, max_new_tokens, setting, use_cache=False)
            num_beams, length_penalty, early_stopping, num_return = setting
            case = {
                "prompt": prompt, "max_new_tokens": max_new_tokens, "num_beams": num_beams,
                "length_penalty": length_penalty, "early_stopping": early_stopping,
                "num_return_sequences": num_return,
            }
            if cached["sequences"] == full["sequences"]:
                case.update(reference="generate", **cached)
            else:
                case.update(reference="generate(use_cache=False)", **full, cached_generate=cached)
            cases.append(case)
    return cases


def write(path: Path, model: str, cases: list[dict], note: str = "") -> None:
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "model": model, "cases": cases}
    if note:
        record["note"] = note
    path.write_text(json.dumps(record, indent=1) + "\n")
    longest = max(len(s) for c in cases for s in c["sequences"])
    differ = sum(c["reference"] != "generate" for c in cases)
    print(f"{model:32s} {len(cases)} cases, longest hypothesis {longest} tokens, "
          f"{differ} where cached generate differs from full forward")


def load_reference(folder: Path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    patched = phimoe_longrope_as_designed(ref.eval())
    return ref, patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fixture names and/or 'shipped' (default: all)")
    args = parser.parse_args()
    variants = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
    for i, name in enumerate(variants):
        if args.only and name not in args.only:
            continue
        folder = FIXTURES / name
        ref, patched = load_reference(folder)
        greedy_prompt = load_file(folder / "reference.safetensors")["greedy.prompt"].tolist()
        rules = policy(folder)
        vocab = load_tokenizer(folder).vocab_size  # ids the tokenizer knows, as make_fixtures samples them
        short_prompt = np.random.default_rng(args.seed + i).integers(0, vocab, 7).tolist()
        note = "rotary embedding switched by length (phimoe_longrope_as_designed)" if patched else ""
        write(folder / "beam_reference.json", f"tests/fixtures/{name}",
              cases_for(ref, rules, [greedy_prompt, short_prompt], 20), note)

    if args.only and "shipped" not in args.only:
        return
    ref, _ = load_reference(BUNDLED_MODEL)
    tokenizer = minislm.load(BUNDLED_MODEL).tokenizer
    prompts = [tokenizer.encode("ROMEO:"), tokenizer.encode_chat([{"role": "user", "content": "Speak, Juliet."}])]
    write(SHIPPED_REFERENCE, "minislm/assets/shakespeare", cases_for(ref, policy(BUNDLED_MODEL), prompts, 30),
          "generation_config.json's repetition_penalty (1.2) applies, as in generate()")


if __name__ == "__main__":
    main()
