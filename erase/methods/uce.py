"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau; WACV 2024, arXiv 2308.14761).

A closed-form edit of every cross-attention key and value projection; no training, no UNet evaluation.
Cross-attention reads the text only through W c (c: one token's text-encoder output), so the edit asks
each W to send the erased concept's tokens where a guide's tokens went, and to keep preserved tokens' images:

  min_W'  sum_e ||W' c_e - W g_e||^2 + sum_p ||W' c_p - W c_p||^2 + lambda ||W' - W||_F^2

Notation (paper -> code):
  c_e, g_e   `erase` / `guide` vectors: the tokens of each erase prompt from the concept's first token to the
             end of the 77, and the same positions of the guide prompt (the prompt with the concept replaced by
             `guide`, removed when it is ""; the authors' newer code uses only the last word's token and an
             empty guide's BOS, their older code the last word and everything after it)
  c_p        every token of each preserved prompt ("" included unless --preserve none)
  lambda     `lam`, 0.5 as in the reference; s_e, s_p: `erase_scale`, `preserve_weight` (1.0, reference)
Solution (normal equations), with A = lambda I + s_e sum g c^T + s_p sum c_p c_p^T and
B = lambda I + s_e sum c c^T + s_p sum c_p c_p^T:
  1. W' B = W A   for every edited W, so  W' = W M  with  M = A B^-1.
  2. A and B depend only on the text, so M (D x D, D the text width) is solved once, in float64, and every
     to_k / to_v weight is multiplied by it. The condition number of B, shared by every layer, is recorded.
Concepts are expanded into the vocabulary's prompt templates (erase.vocabulary): measured on the shapes model,
bare words neither erase "a red circle" nor protect "a red square".

SD3 / FLUX.1 (erase.backbones.mmdit.CLOSED_FORM): the text stream's keys and values read hidden states that the
timestep's modulation (and, after the first block, the image) has changed, so the exact counterpart of attn2's W c is
the text embedder (`context_embedder`, the file's `txt_in` / `context_embedder`), which maps each token of the text
encoder's sequence into the stream; its bias adds the same to every token and stays. With `pooled` (the default there)
the pooled vector's embedder (its first layer, which feeds every block's modulation) gets the same closed form, solved
apart: its vectors are one per prompt (the erase prompts' pooled vectors sent to their guides', the preserved prompts'
kept). Measured on the shapes-world FLUX.1, the text embedder alone does not erase: the pooled vector carries the shape.

RECE (`robust` rounds; Gong, Chen, Wei, Chen, Wu; ECCV 2024, arXiv 2407.12383): after the edit, find in closed form
the embedding c* that the edited layers map closest to what the original layers made of the concept,
  c* = argmin_c' sum_l ||W'_l c' - W_l c||^2 + mu ||c'||^2 = (sum_l W'_l^T W'_l + mu I)^-1 (sum_l W'_l^T W_l) c,
(mu = `robust_lambda` times the mean eigenvalue of sum_l W'_l^T W'_l, so the flag does not depend on the layers'
scale) and erase it too: (c*, g) joins the erase pairs and M is solved again. With W'_l = W_l M and
G = sum_l W_l^T W_l over every edited tensor this is c* = (M^T G M + mu I)^-1 M^T G c: one D x D solve per round
for every concept token at once. Differs from the authors' code, which edits the already-edited weights each round:
here every round solves from the original W with all pairs found so far, so the preserve terms keep holding the
preserved prompts to the input model rather than to the previous round's edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.engine.preserve import preserved_groups, preserved_prompts
from erase.errors import UsageError
from erase.methods.base import ClosedFormMethod
from erase.methods.options import option
from erase.vocabulary import Vocabulary, expand, token_span, without


@dataclass
class UCEConfig:
    guide: str = option("", "What an erased concept becomes in its prompts: \"\" removes it (reference), or a word (\"art\").")
    lam: float = option(0.5, "Weight of keeping each old k/v map, lambda (reference 0.5).", flag="--lambda")
    erase_scale: float = option(1.0, "Weight of the erase terms, s_e (reference 1.0).")
    preserve_weight: float = 1.0  # s_p, the preserve scale (reference 1.0)
    expand: bool = True  # embed concepts in the vocabulary's templates (False: use them as given)
    robust: int = option(0, "RECE rounds: find the embedding that still brings the concept back through the edit, erase it "
                         "too, N times (0: plain UCE; authors: 1-2 for objects, 3 for nudity).")
    robust_lambda: float = option(0.1, "RECE's ridge on that embedding, mu, relative to the layers' scale.")  # see adversarial_embeddings
    balance: int = option(0, "Re-weight the preserved concepts by how far the edit moved each, N rounds: the nearest "
                          "neighbour is held hardest (0: equal weights, reference).")
    # measured on the shapes-world FLUX.1 (benchmarks/shapes_flux.py): the text embedder alone leaves circles at 0.94; with
    # the pooled embedder too, 0.00 (RECE's rounds and --balance act on the token system only)
    pooled: bool | None = option(None, "SD3 / FLUX.1: also edit the pooled text vector's embedder in closed form (one vector "
                                 "per prompt; it feeds every block's modulation). Default: on there.", flag="--pooled/--no-pooled")

    def validate(self) -> None:
        if self.lam <= 0:
            raise UsageError("--lambda must be > 0 (it keeps the system solvable)")
        if not 0 <= self.robust <= 10 or not 0 <= self.balance <= 10:
            raise UsageError("--robust and --balance must be between 0 and 10 rounds")
        if self.robust_lambda <= 0:
            raise UsageError("--robust-lambda must be > 0")
        if self.erase_scale < 0 or self.preserve_weight < 0:
            raise UsageError("--erase-scale and --preserve-weight must be >= 0")


class UCE(ClosedFormMethod):
    """Closed form: `solve(weights)` returns the edited to_k / to_v weights; nothing is trained."""

    name = "uce"

    def __init__(self, cfg: UCEConfig, concepts: list[str], *, preserve: list[str], vocab: Vocabulary, tokenizer, encode,
                 encode_pooled=None) -> None:
        cfg.validate()
        self.cfg, self.concepts, self.preserve = cfg, concepts, preserve
        self.vocab, self.tokenizer, self.encode, self.encode_pooled = vocab, tokenizer, encode, encode_pooled

    def edited(self, names: list[str], transformer: bool = False) -> list[str]:
        """The parameters this edit changes among `names`: `edits`', and the pooled embedder with `pooled`."""
        from erase.backbones.mmdit import POOLED

        if self.cfg.pooled and not transformer:
            raise UsageError("--pooled is for SD3 / FLUX.1 files (a UNet's pooled vector, SDXL's, is not edited)")
        pooled = transformer if self.cfg.pooled is None else self.cfg.pooled
        return [n for n in names if self.edits(n, transformer) or (pooled and n == POOLED)]

    @staticmethod
    def edits(name: str, transformer: bool = False) -> bool:
        """True for the weights UCE changes (diffusers names): a UNet's attn2 keys and values, an SD3 / FLUX.1
        transformer's text embedder (erase.backbones)."""
        from erase.engine.params import closed_form_edits

        return closed_form_edits(name, transformer)

    def _prompts(self, concept: str) -> list[str]:
        return expand(concept, self.vocab) if self.cfg.expand else [concept]

    def pairs(self) -> list[tuple[str, str, str]]:
        """(erase prompt, its guide prompt, concept) for every erased concept."""
        return [(p, without(p, c, self.cfg.guide), c) for c in self.concepts for p in self._prompts(c)]

    def preserved_prompts(self) -> list[str]:
        return preserved_prompts(self.preserve, self.vocab, expand_concepts=self.cfg.expand)

    def system(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A and B (float64, D x D) and counts; `info["rows"]` holds the erase vectors c and their guides g (n x D each),
        `info["grams"]` each preserved concept's sum of c_p c_p^T, unweighted (for `balance`)."""
        lam, se, sp = self.cfg.lam, self.cfg.erase_scale, self.cfg.preserve_weight
        width = self.encode([""]).shape[-1]
        A = B = lam * torch.eye(width, dtype=torch.float64)
        n_erase = n_preserve = 0
        rows_c, rows_g = [], []
        pairs = self.pairs()
        for start in range(0, len(pairs), 32):
            batch = pairs[start : start + 32]
            # the solve is float64 on the CPU whatever device encoded the prompts (--device cuda)
            e, g = self.encode([p for p, _, _ in batch]).double().cpu(), self.encode([q for _, q, _ in batch]).double().cpu()
            for k, (p, _, concept) in enumerate(batch):
                span = token_span(self.tokenizer, p, concept)
                if span is None:  # the concept's tokens were cut at 77: nothing of it is left to erase
                    continue
                c, gd = e[k, span[0]:], g[k, span[0]:]
                A = A + se * gd.T @ c
                B = B + se * c.T @ c
                n_erase += c.shape[0]
                rows_c.append(c)
                rows_g.append(gd)
        grams, n_prompts = {}, 0
        for concept, kept in preserved_groups(self.preserve, self.vocab, expand_concepts=self.cfg.expand).items():
            n_prompts += len(kept)
            gram = torch.zeros(width, width, dtype=torch.float64)
            for start in range(0, len(kept), 32):
                emb = self.encode(kept[start : start + 32]).double().cpu().flatten(0, 1)  # every token of every prompt
                gram = gram + emb.T @ emb
                n_preserve += emb.shape[0]
            grams[concept] = gram
            A, B = A + sp * gram, B + sp * gram
        rows = (torch.cat(rows_c), torch.cat(rows_g)) if rows_c else None
        return A, B, {"erase_vectors": n_erase, "preserve_vectors": n_preserve, "erase_prompts": len(pairs),
                      "preserve_prompts": n_prompts, "rows": rows, "grams": grams}

    def solve(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """New values for `weights` (to_k / to_v, any dtype): W' = W A B^-1, in float64; the pooled embedder's (with
        `pooled`) from its own system."""
        from erase.backbones.mmdit import POOLED

        if POOLED in weights:
            rest = {n: w for n, w in weights.items() if n != POOLED}
            new, info = self.solve(rest)
            new[POOLED], info["pooled"] = self._solve_pooled(weights[POOLED])
            return new, info
        A, B, info = self.system()
        rows, grams = info.pop("rows"), info.pop("grams")
        if info["erase_vectors"] == 0:  # nothing to erase: every weight stays exactly as it is
            return {n: w.clone() for n, w in weights.items()}, {**info, "condition_number": 1.0}
        M = torch.linalg.solve(B, A.T).T  # B is symmetric: M = A B^-1
        G = sum(w.double().cpu().T @ w.double().cpu() for w in weights.values())  # sum_l W_l^T W_l: the layers' outputs' metric
        if self.cfg.balance and grams:
            M, A, B, info["balance_rounds"] = self._balance(M, A, B, G, grams)
        info["normal_equation_residual"] = float((M @ B - A).norm() / A.norm())
        info["condition_number"] = float(torch.linalg.cond(B))
        info["preserved_moved"] = {c: moved(M, G, gram) for c, gram in grams.items()}
        if self.cfg.robust:
            M, info["robust_rounds"] = self._robust(M, A, B, G, rows)
        new = {n: (w.double() @ M).to(torch.float32) for n, w in weights.items()}
        return new, info

    def _solve_pooled(self, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The closed form on the pooled embedder: A = lam I + s_e sum g c^T + s_p sum p p^T, B = lam I + s_e sum c c^T +
        s_p sum p p^T over pooled vectors (c an erase prompt's, g its guide's, p a preserved prompt's); W' = W A B^-1."""
        lam, se, sp = self.cfg.lam, self.cfg.erase_scale, self.cfg.preserve_weight
        pairs, kept = self.pairs(), self.preserved_prompts()
        c = torch.cat([self.encode_pooled([p for p, _, _ in pairs[i:i + 32]]).double().cpu() for i in range(0, len(pairs), 32)])
        g = torch.cat([self.encode_pooled([q for _, q, _ in pairs[i:i + 32]]).double().cpu() for i in range(0, len(pairs), 32)])
        eye = torch.eye(c.shape[1], dtype=torch.float64)
        A, B = lam * eye + se * g.T @ c, lam * eye + se * c.T @ c
        if kept:
            p = torch.cat([self.encode_pooled(kept[i:i + 32]).double().cpu() for i in range(0, len(kept), 32)])
            A, B = A + sp * p.T @ p, B + sp * p.T @ p
        M = torch.linalg.solve(B, A.T).T
        info = {"erase_vectors": c.shape[0], "preserve_vectors": len(kept), "condition_number": float(torch.linalg.cond(B))}
        return (weight.double() @ M).to(torch.float32), info

    def _balance(self, M, A, B, G, grams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
        """Re-weight each preserved concept by how far the edit moved it: after each solve a concept's weight is multiplied
        by its share of the movement relative to the least-moved concept's, so the concept the edit reaches most (the
        nearest neighbour) is held hardest and none is held less than `preserve_weight`; then solve again."""
        sp, weight, rounds = self.cfg.preserve_weight, dict.fromkeys(grams, 1.0), []
        for r in range(1, self.cfg.balance + 1):
            move = {c: moved(M, G, gram) for c, gram in grams.items()}
            floor = max(min(move.values()), 1e-12)
            new_weight = {c: weight[c] * move[c] / floor for c in grams}
            for c, gram in grams.items():
                A, B = A + sp * (new_weight[c] - weight[c]) * gram, B + sp * (new_weight[c] - weight[c]) * gram
            weight = new_weight
            M = torch.linalg.solve(B, A.T).T
            rounds.append({"round": r, "moved_before": move, "weights": dict(weight)})
        return M, A, B, rounds

    def _robust(self, M, A, B, G, rows) -> tuple[torch.Tensor, list[dict]]:
        """RECE's rounds: each finds c* for every erase vector on the current M and erases it toward the same guide."""
        C, guides = rows
        se, rounds = self.cfg.erase_scale, []
        for r in range(1, self.cfg.robust + 1):
            C_adv = adversarial_embeddings(M, G, C, self.cfg.robust_lambda)
            before = restoration(M, G, C_adv, C)
            A, B = A + se * guides.T @ C_adv, B + se * C_adv.T @ C_adv
            M = torch.linalg.solve(B, A.T).T
            rounds.append({"round": r, "restored_before": before, "restored_after": restoration(M, G, C_adv, C),
                           "plain_after": restoration(M, G, C, C),
                           "adversarial_norm_ratio": float(C_adv.norm(dim=1).mean() / C.norm(dim=1).mean()),
                           "normal_equation_residual": float((M @ B - A).norm() / A.norm()), "condition_number": float(torch.linalg.cond(B))})
        return M, rounds


def adversarial_embeddings(M: torch.Tensor, G: torch.Tensor, C: torch.Tensor, mu: float) -> torch.Tensor:
    """RECE's c* for every row c of C: (M^T G M + mu' I)^-1 M^T G c, with mu' = mu times the mean eigenvalue of M^T G M
    (the trace / D) so that `mu` does not depend on the layers' scale; G = sum_l W_l^T W_l over the edited layers."""
    H = M.T @ G @ M
    mu_abs = mu * float(torch.trace(H)) / H.shape[0]
    rhs = M.T @ G @ C.T
    return torch.linalg.solve(H + mu_abs * torch.eye(H.shape[0], dtype=H.dtype), rhs).T


def moved(M: torch.Tensor, G: torch.Tensor, gram: torch.Tensor) -> float:
    """How far the edit moves the layers' outputs for a set of vectors with Gram matrix `gram` (sum x x^T), relative to
    those outputs: sum_l ||W_l M x - W_l x||^2 / sum_l ||W_l x||^2 over the vectors (0: untouched)."""
    E = M - torch.eye(M.shape[0], dtype=M.dtype)
    return float(torch.trace(E.T @ G @ E @ gram) / torch.trace(G @ gram).clamp_min(1e-30))


def restoration(M: torch.Tensor, G: torch.Tensor, X: torch.Tensor, C: torch.Tensor) -> float:
    """How much of the original layers' output for C the edited layers give for X: 1 - sum_l ||W_l M x - W_l c||^2 /
    sum_l ||W_l c||^2, averaged over rows (1: X restores the concept exactly; 0: no better than a zero input)."""
    D = X @ M.T - C  # rows of (M x - c)
    err = torch.einsum("nd,de,ne->n", D, G, D)
    ref = torch.einsum("nd,de,ne->n", C, G, C)
    return float(1 - (err / ref).mean())
