"""Human Feedback Inversion (HFI, Kim et al., ECCV 2024, arXiv 2407.21032): erase what people flag.

    erase feedback collect MODEL --concept "..." --out DIR   images + manifest.jsonl (regenerable)
    erase feedback label DIR                                   a local labelling page -> DIR/labels.jsonl
    erase feedback invert DIR MODEL --out token.safetensors    reward-weighted textual inversion of one token
    erase run MODEL --embedding token.safetensors --concepts "<token>"

The authors released no code; this follows the paper's description (see each module).
"""
