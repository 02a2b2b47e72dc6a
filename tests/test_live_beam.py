"""Live: beam search on random small Phi-3 and PhiMoE configs, minislm vs transformers'
generate(num_beams=N, do_sample=False), with hypothesis drawing the model, the
prompt, N and the scoring rules; and on the shipped model.

transformers' cached generate is what users run, so it is the reference. Where it
disagrees with its own full forward (generate(use_cache=False)), the cache is at
fault (tests/conftest.py: a window of 1; LongRoPE's switch), and minislm is compared
with the full-forward answer instead; the test checks that this happens only in
those known cases.
"""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minislm
from minislm.load import BUNDLED_MODEL
from minislm.verify import phimoe_longrope_as_designed
from conftest import import_reference, save_random_model
from test_live_phimoe import phimoe_configs
from test_live_transformers import phi3_configs

torch, transformers = import_reference()
NEW_TOKENS = 10


def transformers_beams(ref, prompt, num_beams, length_penalty, early_stopping, num_return, use_cache=True):
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return, use_cache=use_cache,
            return_dict_in_generate=True,
        )
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    return [out.sequences[i, len(prompt) : len(prompt) + n].tolist() for i, n in enumerate(lengths)]


def known_cache_disagreement(config: dict, prompt_len: int) -> bool:
    """The cases tests/conftest.py lists where transformers' cache is not its full forward."""
    original = config.get("original_max_position_embeddings") or (config.get("rope_parameters") or {}).get(
        "original_max_position_embeddings")
    crosses = original is not None and prompt_len <= original < prompt_len + NEW_TOKENS
    return config.get("sliding_window") == 1 or crosses


beam_settings = st.tuples(
    st.integers(2, 4),  # num_beams
    st.sampled_from([1.0, 0.0, 2.0, -0.5]),  # length_penalty
    st.sampled_from([False, True, "never"]),  # early_stopping
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model_config=st.one_of(phi3_configs().map(lambda c: ("phi3", c)), phimoe_configs().map(lambda c: ("phimoe", c))),
    prompt_len=st.integers(1, 30),
    beams=beam_settings,
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_random_configs_beam_search_matches_transformers(model_config, prompt_len, beams, data, seed):
    model_type, config = model_config
    num_beams, length_penalty, early_stopping = beams
    num_return = data.draw(st.integers(1, num_beams), label="num_return_sequences")
    with tempfile.TemporaryDirectory() as tmp:
        if model_type == "phimoe":
            reference = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**config))
        else:
            reference = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config))
        reference = save_random_model(reference, Path(tmp), seed)
        phimoe_longrope_as_designed(reference)
        ours = minislm.load(tmp)
        prompt = np.random.default_rng(seed).integers(0, config["vocab_size"], prompt_len).tolist()
        mine = [list(h.ids) for h in ours.beam_search(prompt, NEW_TOKENS, num_beams, length_penalty=length_penalty,
                                                      early_stopping=early_stopping, num_return_sequences=num_return)]
        cached = transformers_beams(reference, prompt, num_beams, length_penalty, early_stopping, num_return)
        full = transformers_beams(reference, prompt, num_beams, length_penalty, early_stopping, num_return, False)
        if cached == full:
            assert mine == cached
        else:
            assert known_cache_disagreement(config, prompt_len), "transformers' cache disagrees in an unknown case"
            assert mine == full


def test_shipped_model_beam_search_matches_transformers():
    """Two prompts x two settings, live (the default suite has the recorded twelve)."""
    ours = minislm.load(BUNDLED_MODEL)
    reference = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
    prompts = [ours.tokenizer.encode("JULIET:"), ours.tokenizer.encode_chat([{"role": "user", "content": "Who art thou?"}])]
    for prompt in prompts:
        for num_beams, length_penalty, early_stopping, num_return in [(3, 1.0, False, 2), (4, 0.0, True, 1)]:
            mine = ours.beam_search(prompt, NEW_TOKENS, num_beams, length_penalty=length_penalty,
                                    early_stopping=early_stopping, num_return_sequences=num_return)
            theirs = transformers_beams(reference, prompt, num_beams, length_penalty, early_stopping, num_return)
            assert [list(h.ids) for h in mine] == theirs
