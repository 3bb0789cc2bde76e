"""Textual-inversion embeddings: learned tokens, read and written in the files other tools use.

    emb = load_embedding("red-circle.safetensors")     # the token is the file's erase.token, else its stem (A1111)
    add_embeddings(text_encoder, [emb])               # "a <red-circle>" now encodes the learned vector(s)
    save_embedding(emb, "out.safetensors")             # {"emb_params": (n, D)}; SDXL: {"clip_l", "clip_g"}

Read: A1111 safetensors (`emb_params`) and .pt (`string_to_param`), diffusers' `learned_embeds` files
({token: vector}), SDXL pairs (`clip_l` / `clip_g`). A vector of n rows becomes n tokens (`tok`, `tok_1`, ...)
and the prompt's `tok` is spelled out as all of them, as A1111 and diffusers do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.errors import UsageError

SDXL_KEYS = ("clip_l", "clip_g")  # one matrix per text encoder, in the encoders' order
_TOKEN = re.compile(r"^[A-Za-z0-9<>_.\-]{1,60}$")


@dataclass
class Embedding:
    token: str
    vectors: list[torch.Tensor]  # one (n, D_i) matrix per text encoder
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        n = self.vectors[0].shape[0]
        return [self.token] + [f"{self.token}_{i}" for i in range(1, n)]


def check_token(token: str) -> str:
    if not _TOKEN.match(token):
        raise UsageError(f"token {token!r}: use 1-60 letters, digits or <>_.- (no spaces), e.g. <red-circle>")
    return token


def load_embedding(path: Path, token: str | None = None) -> Embedding:
    """Read an embedding file; `token` overrides the name it is used under."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"embedding file {path} does not exist")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{path}: not an embedding file torch can read safely ({type(e).__name__})") from None
    name = token or metadata.get("erase.token")
    if isinstance(state.get("string_to_param"), dict):  # A1111 .pt
        vectors = [next(iter(state["string_to_param"].values()))]
        name = name or state.get("name")
    elif "emb_params" in state:  # A1111 safetensors
        vectors = [state["emb_params"]]
    elif all(k in state for k in SDXL_KEYS):
        vectors = [state[k] for k in SDXL_KEYS]
    elif "encoder_0" in state:  # erase's own, for three towers (SD3 with T5)
        vectors = [state[f"encoder_{i}"] for i in range(len(state))]
    elif len(state) == 1 and isinstance(next(iter(state.values())), torch.Tensor):  # diffusers: {token: vector}
        key, vec = next(iter(state.items()))
        vectors, name = [vec], name or key
    else:
        raise UsageError(f"{path}: not a textual-inversion embedding (keys {sorted(state)[:4]})")
    vectors = [v.detach().float().reshape(-1, v.shape[-1]) for v in vectors]
    return Embedding(check_token(name or path.stem), vectors, metadata)


def save_embedding(emb: Embedding, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A1111's safetensors layout (diffusers' `load_textual_inversion(path, token=...)` reads it too)."""
    from safetensors.torch import save_file

    # one tower: A1111's key; two: SDXL's (FLUX.1's CLIP-L and T5 are stored under them in the towers' order); more: one
    # key per tower in order (SD3 with T5, which no other tool's layout names)
    if len(emb.vectors) == 1:
        state = {"emb_params": emb.vectors[0]}
    elif len(emb.vectors) == 2:
        state = dict(zip(SDXL_KEYS, emb.vectors))
    else:
        state = {f"encoder_{i}": v for i, v in enumerate(emb.vectors)}
    meta = {"erase.token": emb.token, **(metadata or {})}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def add_embeddings(text, embeddings: list[Embedding]) -> None:
    """Teach a `models.TextEncoder` (or an SD3 / FLUX.1 `TransformerText`) the embeddings' tokens (new rows of each
    encoder's token table)."""
    for emb in embeddings:
        if len(emb.vectors) != len(text.towers):
            raise UsageError(f"embedding {emb.token} has {len(emb.vectors)} vector set(s); this model has {len(text.towers)} text "
                             "encoder(s)")
        for (tok, enc), vec in zip(text.towers, emb.vectors):
            table = enc.get_input_embeddings()
            if vec.shape[-1] != table.weight.shape[1]:
                raise UsageError(f"embedding {emb.token} has width {vec.shape[-1]}; this model's text encoder takes {table.weight.shape[1]}")
            # a token the tokenizer already reads as one word ("cat" is "cat</w>") would take that word over in every prompt
            if any(len(tok.tokenize(t)) == 1 for t in emb.tokens) or tok.add_tokens(emb.tokens) != len(emb.tokens):
                raise UsageError(f"token {emb.token!r} is already a word of the tokenizer; load the embedding under another name")
            enc.resize_token_embeddings(len(tok), mean_resizing=False)  # the new rows are set just below
            enc.get_input_embeddings().requires_grad_(False)  # the resized table is a new module: keep it frozen
            ids = tok.convert_tokens_to_ids(emb.tokens)
            with torch.no_grad():
                enc.get_input_embeddings().weight[ids] = vec.to(table.weight.dtype)
        if len(emb.tokens) > 1:
            text.spellings[emb.token] = " ".join(emb.tokens)


def load_embeddings(paths) -> list[Embedding]:
    embs = [load_embedding(Path(p)) for p in paths]
    names = [e.token for e in embs]
    if len(set(names)) != len(names):
        raise UsageError(f"two embeddings use the same token: {', '.join(names)}")
    return embs


class TrainableTokens(torch.nn.Module):
    """A token table with some rows replaced by trainable vectors (k x D); the table itself stays frozen. Textual
    inversion trains one such row (erase feedback invert, erase attack's CCE), adversarial training a soft prefix."""

    def __init__(self, table: torch.nn.Embedding, token_ids: list[int], vectors: torch.nn.Parameter | None) -> None:
        super().__init__()
        self.table, self.token_ids, self.vectors = table, list(token_ids), vectors

    def rows(self) -> torch.Tensor:
        """The replacement rows (k x D): the trained vectors here; UnlearnDiffAtk's prefix computes them."""
        return self.vectors

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.table(ids)
        rows = self.rows().to(out.dtype)
        for i, token_id in enumerate(self.token_ids):
            out = torch.where((ids == token_id).unsqueeze(-1), rows[i], out)
        return out


def trainable_tokens(text, tokens: list[str], init: str) -> list[torch.nn.Parameter]:
    """Add `tokens` to every encoder of `text` (erase.models.TextEncoder), each starting at the mean embedding of the
    word `init`, and return their vectors as one fp32 parameter (k x D) per encoder."""
    init_vectors = []
    for tok, enc in text.towers:
        ids = tok(init, add_special_tokens=False).input_ids
        if not ids:
            raise UsageError(f"--init {init!r} has no tokens")
        init_vectors.append(enc.get_input_embeddings().weight[ids].mean(0, keepdim=True))
    add_embeddings(text, [Embedding(check_token(t), init_vectors) for t in tokens])
    params = []
    for (tok, enc), v0 in zip(text.towers, init_vectors):
        vectors = torch.nn.Parameter(v0.detach().float().repeat(len(tokens), 1))
        enc.set_input_embeddings(TrainableTokens(enc.get_input_embeddings(), tok.convert_tokens_to_ids(tokens), vectors))
        params.append(vectors)
    return params
