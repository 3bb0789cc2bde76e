"""Adversarial prompt prefixes: k tokens, each a distribution over the tokenizer's vocabulary (UnlearnDiffAtk).

Notation (Zhang et al., ECCV 2024, arXiv 2310.11868, Sec. 4):
  p_i      `dist[i]`, a point of the probability simplex over the V real tokens (BOS / EOS / added tokens excluded)
  E        the text encoder's token table (V x D)
  e_i      the i-th prefix token's embedding. The forward pass uses the straight-through one-hot of p_i:
           e_i = (onehot(argmax p_i) + p_i - stopgrad(p_i)) E, so its value is exactly a real token's row while the
           gradient reaches every entry of p_i (d loss / d p_i = E (d loss / d e_i)).
  Pi       the Euclidean projection onto the simplex (Duchi et al. 2008), applied after every optimiser step.
The prefix enters the text encoder through stand-in tokens ("<erase-adv0> <erase-adv1> ... a red circle") whose rows of the
token table are replaced by e_i; everything else about the prompt is encoded as usual.
"""

from __future__ import annotations

import torch

from erase.embeddings import TrainableTokens

STAND_IN = "<erase-adv{}>"


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Each row of `v` projected onto {p : p >= 0, sum p = 1} in the Euclidean norm (Duchi et al. 2008, Fig. 1)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True)  # the number of entries that stay positive
    theta = css.gather(-1, rho - 1) / rho
    return (v - theta).clamp(min=0)


def straight_through_one_hot(dist: torch.Tensor) -> torch.Tensor:
    """onehot(argmax) in the forward pass, the identity's gradient in the backward."""
    hard = torch.nn.functional.one_hot(dist.argmax(-1), dist.shape[-1]).to(dist.dtype)
    return hard + (dist - dist.detach())  # exactly zero in the forward pass: the rows are the words themselves


class Prefix(torch.nn.Module):
    """The k distributions p_i (one set, shared by every text encoder: SDXL's two tokenizers number words alike)."""

    def __init__(self, k: int, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dist = torch.nn.Parameter(torch.full((k, vocab), 1.0 / vocab))  # uniform at the start (the paper's init)
        self.hard: list[int] | None = None  # token ids used instead of `dist` (evaluating the argmax prompt), or None

    @torch.no_grad()
    def project(self) -> None:
        self.dist.copy_(project_to_simplex(self.dist.float()).to(self.dist.dtype))

    def ids(self) -> list[int]:
        return self.dist.argmax(-1).tolist()


class PrefixTokens(TrainableTokens):
    """One encoder's token table with the stand-in rows replaced by e_i = ST-onehot(p_i) E (or E[hard ids])."""

    def __init__(self, table: torch.nn.Embedding, stand_in_ids: list[int], prefix: Prefix) -> None:
        super().__init__(table, stand_in_ids, None)
        self.prefix = [prefix]  # a list: not a submodule of the encoder (its parameter is the attack's, not the model's)

    def rows(self) -> torch.Tensor:
        prefix = self.prefix[0]
        words = self.table.weight[: prefix.vocab].detach()  # only the distributions learn
        if prefix.hard is not None:
            return words[torch.tensor(prefix.hard, device=words.device)]
        return straight_through_one_hot(prefix.dist.to(words.device)).to(words.dtype) @ words


def install_prefix(text, k: int) -> tuple[Prefix, str]:
    """Add k stand-in tokens to every CLIP tower of `text` (erase.models.TextEncoder, or an SD3 / FLUX.1
    TransformerText), their rows read from one `Prefix`; returns it and the text to put before a prompt
    ("<erase-adv0> <erase-adv1> ..."). The prefix is one distribution over CLIP's words; a T5 tower (its own
    vocabulary) reads the prefix as the words it currently is (the argmax, or the hard ids), re-tokenised with T5's own
    tokenizer at every encoding: the words are the attack's, the gradient reaches the prefix through the CLIP towers
    only (on FLUX.1 that is CLIP-L's pooled vector)."""
    from erase.errors import UsageError
    from erase.models import VOCAB_SIZE

    tokens = [STAND_IN.format(i) for i in range(k)]
    prefix = Prefix(k, VOCAB_SIZE - 2)  # the tokenizer's words: BOS (49406) and EOS (49407) would restart or end the prompt
    clip = [(tok, enc) for tok, enc in text.towers if tok.vocab_size == VOCAB_SIZE]
    if not clip:
        raise UsageError(f"UnlearnDiffAtk: its prefix is one distribution over CLIP's {VOCAB_SIZE} words, and this model has "
                         "no CLIP text tower (use --attack cce)")
    if len(clip) < len(text.towers):
        words = clip[0][0]

        def plain(prompt: str) -> str:
            return prompt.replace(" ".join(tokens), words.decode(prefix.hard or prefix.ids()).strip())

        text.plain_words = plain  # what the other vocabularies read (erase.backbones.text.TransformerText)
    for tok, enc in clip:
        if tok.add_tokens(tokens) != k:
            raise RuntimeError("the adversarial stand-in tokens are already in this tokenizer")
        enc.resize_token_embeddings(len(tok), mean_resizing=False)
        enc.get_input_embeddings().requires_grad_(False)  # the resized table is a new module: the words stay frozen
        enc.set_input_embeddings(PrefixTokens(enc.get_input_embeddings(), tok.convert_tokens_to_ids(tokens), prefix))
    return prefix, " ".join(tokens)
