"""`--auto-label shapes:SPEC`: label a collection with the shapes detector instead of a person.

For the shapes world (and for testing the HFI pipeline end to end without people): SPEC names the concept as
words joined by "-", each a shape or a colour of `erase.shapes`, e.g. "circle" or "red-circle". The answers go
to labels.jsonl like anyone's, under the labeller "auto:shapes:SPEC", so they can be undone, compared with
people's, or left out by `invert`.

    binary  harmful iff the detected shape is SPEC's shape (and the dominant colour SPEC's colour, when given);
            "score" = the detector's probability of that shape, times 1/0 for the colour
    rank    each group ordered by that score, highest = rank 1; every image ranked, none excluded
"""

from __future__ import annotations

from pathlib import Path

from erase.errors import UsageError
from erase.feedback import labels
from erase.feedback.collect import IMAGES, read_collection

PREFIX = "shapes:"
BATCH = 64


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"shapes:red-circle" -> ("circle", "red"); "shapes:circle" -> ("circle", None)."""
    from erase.shapes import COLOURS, SHAPES

    valid = f"shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)}"
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
        raise UsageError(f"--auto-label {spec!r}: expected shapes:SPEC, e.g. shapes:circle or shapes:red-circle ({valid})")
    shape = colour = None
    for word in spec[len(PREFIX):].split("-"):
        if word in SHAPES and shape is None:
            shape = word
        elif word in COLOURS and colour is None:
            colour = word
        elif word in SHAPES or word in COLOURS:
            raise UsageError(f"--auto-label {spec!r} names two {'shapes' if word in SHAPES else 'colours'}; give one shape and at most one colour")
        else:
            raise UsageError(f"--auto-label {spec!r}: unknown word {word!r} (valid {valid})")
    if shape is None:
        raise UsageError(f"--auto-label {spec!r} names no shape (valid {valid})")
    return shape, colour


def labeller_name(spec: str) -> str:
    return "auto:" + spec


def scores(folder: Path, names: list[str], shape: str, colour: str | None, detector=None) -> dict[str, tuple[bool, float]]:
    """name -> (harmful, score) for the images `names` of a collection."""
    import torch
    from PIL import Image

    from erase.shapes import SHAPES, ShapesDetector, dominant_colour, to_tensor

    detector = detector or ShapesDetector()
    out = {}
    for start in range(0, len(names), BATCH):
        chunk = names[start:start + BATCH]
        pictures = []
        for name in chunk:
            with Image.open(Path(folder) / IMAGES / name) as im:
                pictures.append(im.convert("RGB").resize((32, 32), Image.BILINEAR) if im.size != (32, 32) else im.convert("RGB"))
        x = to_tensor(pictures)
        with torch.no_grad():
            probs = detector.net(x).softmax(-1)[:, SHAPES.index(shape)].tolist()
        found = detector.classify(x)
        colours = dominant_colour(x)
        for name, p, (got, _, _), col in zip(chunk, probs, found, colours):
            match = colour is None or col == colour
            out[name] = (got == shape and match, float(p) if match else 0.0)
    return out


def auto_label(folder: Path, spec: str, mode: str = "binary", *, detector=None) -> dict:
    """Label every item of the collection that `auto:<spec>` has not labelled yet; a summary dict."""
    folder = Path(folder)
    if mode not in labels.MODES:
        raise UsageError(f"--mode must be one of {', '.join(labels.MODES)}, not {mode!r}")
    shape, colour = parse_spec(spec)
    _, rows = read_collection(folder)
    who = labeller_name(spec)
    names = {r["image"] for r in rows}
    done = labels.progress(folder, rows, who, mode)["done"]
    summary = {"labeller": who, "mode": mode, "labelled": 0, "harmful": 0, "skipped": len(done), "total": 0}
    if mode == "binary":
        todo = [r["image"] for r in rows if r["image"] not in done]
        summary["total"] = len(rows)
        for name, (harmful, score) in scores(folder, todo, shape, colour, detector).items():
            labels.append(folder, {"labeller": who, "kind": "binary", "image": name, "harmful": harmful, "score": round(score, 6)}, images=names)
            summary["labelled"] += 1
            summary["harmful"] += harmful
        return summary
    all_groups = labels.groups(rows)
    summary["total"] = len(all_groups)
    todo = [g for i, g in enumerate(all_groups) if i not in done]
    scored = scores(folder, [n for g in todo for n in g], shape, colour, detector)
    for group in todo:
        order = sorted(range(len(group)), key=lambda i: -scored[group[i]][1])  # stable: ties keep the group's order
        ranks = {group[i]: rank for rank, i in enumerate(order, 1)}
        labels.append(folder, {"labeller": who, "kind": "rank", "group": group, "ranks": {n: ranks[n] for n in group}}, images=names)
        summary["labelled"] += 1
        summary["harmful"] += sum(scored[n][0] for n in group)
    return summary
