"""From labels to a reward per image: what the inversion should learn from, and how much.

Binary labels (HFI's clear-cut concepts): r(x) = the share of labellers who flagged x.
Rankings of groups (HFI's fuzzy concepts): a Bradley-Terry model, P(x ranked above y) = s_x / (s_x + s_y), fitted by
Hunter's MM iterations (Ann. Statist. 2004) to every ordered pair within each answered group (excluded images take
no part); each image also meets a virtual opponent of strength 1 once each way, which keeps images that always
win or always lose finite. r(x) = (log s_x - min) / (max - min) over the ranked images, so the top image gets 1.

These are the rewards the inversion uses by default. The paper also fits a reward model on CLIP image features to
them, to score the images nobody labelled: `--reward-model clip:PATH` (erase.feedback.reward_model, a local CLIP).
"""

from __future__ import annotations

import math
from collections import defaultdict

from erase.errors import UsageError


def binary_rewards(answers: list[dict]) -> dict[str, float]:
    """image -> share of labellers whose latest answer flags it."""
    latest: dict[tuple[str, str], bool] = {}
    for a in answers:
        if a["kind"] == "binary":
            latest[(a["labeller"], a["image"])] = bool(a["harmful"])
    votes: dict[str, list[bool]] = defaultdict(list)
    for (_, image), harmful in latest.items():
        votes[image].append(harmful)
    return {image: sum(v) / len(v) for image, v in votes.items()}


def comparisons(answers: list[dict]) -> list[tuple[str, str]]:
    """(winner, loser) pairs: within each rank answer, every ranked image beats every image ranked after it."""
    pairs = []
    for a in answers:
        if a["kind"] != "rank":
            continue
        ranked = sorted((r, img) for img, r in a["ranks"].items() if r != "exclude")
        pairs += [(ranked[i][1], ranked[j][1]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
    return pairs


def bradley_terry(pairs: list[tuple[str, str]], iterations: int = 500, tol: float = 1e-10) -> dict[str, float]:
    """log-strengths (mean 0) maximising the Bradley-Terry likelihood of `pairs` (with the virtual opponent)."""
    items = sorted({x for pair in pairs for x in pair})
    wins = defaultdict(float)
    games: dict[str, dict[str, float]] = {x: defaultdict(float) for x in items}
    for winner, loser in pairs:
        wins[winner] += 1
        games[winner][loser] += 1
        games[loser][winner] += 1
    s = {x: 1.0 for x in items}
    for _ in range(iterations):
        new = {}
        for x in items:
            # MM update; the virtual opponent (strength 1) adds one win and two games
            denom = sum(n / (s[x] + s[y]) for y, n in games[x].items()) + 2 / (s[x] + 1.0)
            new[x] = (wins[x] + 1) / denom
        change = max(abs(math.log(new[x] / s[x])) for x in items) if items else 0.0
        s = new
        if change < tol:
            break
    logs = {x: math.log(v) for x, v in s.items()}
    mean = sum(logs.values()) / max(len(logs), 1)
    return {x: v - mean for x, v in logs.items()}


def rank_rewards(answers: list[dict]) -> dict[str, float]:
    scores = bradley_terry(comparisons(answers))
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    return {x: (v - lo) / (hi - lo) if hi > lo else 1.0 for x, v in scores.items()}


def rewards(answers: list[dict], kind: str = "auto") -> tuple[dict[str, float], str]:
    """(image -> reward in [0, 1], the kind used). `auto`: rankings when there are any, else binary labels."""
    has = {a["kind"] for a in answers}
    if kind == "auto":
        kind = "rank" if "rank" in has else "binary"
    if kind not in ("binary", "rank"):
        raise UsageError(f"--labels must be auto, binary or rank, not {kind!r}")
    found = binary_rewards(answers) if kind == "binary" else rank_rewards(answers)
    if not found:
        raise UsageError(f"no {kind} labels yet: label the collection first (`erase feedback label DIR`)")
    if not any(v > 0 for v in found.values()):
        raise UsageError("no image was labelled as showing the concept: there is nothing to invert")
    return found, kind
