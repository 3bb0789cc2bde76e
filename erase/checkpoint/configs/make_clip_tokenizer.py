"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) that SD text encoders use.

Run once by a maintainer; the output is committed under configs/clip_tokenizer/ so that
`erase` never downloads a tokenizer. The source is `bpe_simple_vocab_16e6.txt.gz`, the
MIT-licensed BPE data that OpenAI's CLIP and the `open_clip_torch` wheel ship:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python -m erase.checkpoint.configs.make_clip_tokenizer /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

(Installing open_clip_torch itself would pull torchvision and possibly a CUDA torch: only the
wheel's data file is used.) The vocabulary is built exactly as CLIP's SimpleTokenizer does:
256 byte symbols, the same with "</w>", the first 48,894 merges, then the two special tokens.
"""

import gzip
import json
import sys
from pathlib import Path

VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(bpe_gz: str, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], Path(__file__).parent / "clip_tokenizer")
