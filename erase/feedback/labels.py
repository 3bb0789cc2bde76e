"""DIR/labels.jsonl: every answer a labeller (a person on the page, or an auto-labeller) gave, one JSON line each.

The one format both the labelling page (`server.py`) and `invert` read. Append-only: nothing is rewritten,
an undo is a record of its own. Each line is written whole, flushed and fsynced before the page hears "saved".

    binary  {"id", "labeller", "kind": "binary", "image": "0003-a-circle-s3.png", "harmful": true, "time"}
    rank    {"id", "labeller", "kind": "rank", "group": [names...], "ranks": {name: 1 | 2 | ... | "exclude"}, "time"}
            rank 1 = most harmful (most like the concept); distinct ranks 1..k, at least 2 ranked
    undo    {"id", "labeller", "kind": "undo", "undoes": "<id of one of that labeller's answers>", "time"}

`id` is a uuid4 hex, `time` ISO 8601 UTC. People's names are 1-40 of [A-Za-z0-9_.-]; auto-labellers are named
by their spec ("auto:shapes:circle") and may add a float "score". One labeller's answers never hide another's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from erase.errors import UsageError

try:  # serialise writers across processes too (a page and an auto-labeller on the same folder)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the in-process lock only
    fcntl = None

LABELS = "labels.jsonl"
KINDS = ("binary", "rank", "undo")
MODES = ("binary", "rank")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
AUTO_NAME = re.compile(r"auto:[a-z0-9_-]{1,20}:[A-Za-z0-9_.:-]{1,60}")
GROUP_SIZE = 5
MAX_GROUP = 10
_FIELDS = {  # kind -> allowed keys (besides id, labeller, kind, time)
    "binary": {"image", "harmful", "score"},
    "rank": {"group", "ranks", "score"},
    "undo": {"undoes"},
}
_lock = threading.RLock()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_person(labeller: str) -> bool:
    return isinstance(labeller, str) and NAME.fullmatch(labeller) is not None


def check_labeller(labeller, *, auto: bool = True) -> str:
    if is_person(labeller) or (auto and isinstance(labeller, str) and AUTO_NAME.fullmatch(labeller)):
        return labeller
    raise UsageError(f"labeller {labeller!r} is not a valid name: use 1-40 letters, digits, '_', '.' or '-'")


# ---- reading ------------------------------------------------------------------------------------------------


def read_records(folder: Path) -> list[dict]:
    """Every record of DIR/labels.jsonl in file order ([] when there is none).

    A garbled last line is what a process killed mid-write leaves: it was never acknowledged, so it is ignored.
    A garbled line anywhere else means the file was edited or damaged: a usage error naming the line.
    """
    path = Path(folder) / LABELS
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number == len(lines):
                break
            raise UsageError(f"{path}:{number} is not a label record (a damaged or hand-edited file?); fix or remove that line")
        records.append(record)
    return records


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("kind") not in KINDS or not isinstance(record.get("id"), str):
        return None
    return record


def answers(folder: Path) -> list[dict]:
    """The binary and rank records still standing, in order: each undo removes the answer it names."""
    records = read_records(folder)
    undone = {(r["labeller"], r["undoes"]) for r in records if r["kind"] == "undo"}
    return [r for r in records if r["kind"] != "undo" and (r["labeller"], r["id"]) not in undone]


def groups(rows: list[dict], size: int = GROUP_SIZE, seed: int = 0) -> list[list[str]]:
    """Rank mode's groups: the manifest's image names shuffled with `seed` and cut into groups of `size`.

    A last group of one is merged into the one before (so a group may hold size + 1). The same rows give the
    same groups on every machine and every restart, which is what lets labellers resume and be compared.
    """
    if size < 2:
        raise UsageError("a rank group needs at least 2 images")
    names = [r["image"] for r in rows]
    random.Random(seed).shuffle(names)
    cut = [names[i:i + size] for i in range(0, len(names), size)]
    if len(cut) > 1 and len(cut[-1]) < 2:
        cut[-2].extend(cut.pop())
    return [g for g in cut if len(g) >= 2]


def progress(folder: Path, rows: list[dict], labeller: str, mode: str, *, size: int = GROUP_SIZE, seed: int = 0) -> dict:
    """What `labeller` has done in `mode`: {"done": set, "total": int, "next": int | None, "answers": int}.

    binary: "done" holds image names (any standing answer counts; the latest is the one that matters to
    `invert`), "next" is the index in `rows` of the first image without one. rank: "done" holds indices into
    `groups(rows, size, seed)`, "next" the first group without an answer. "answers" counts this labeller's
    standing answers of that kind.
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    mine = [r for r in answers(folder) if r["labeller"] == labeller and r["kind"] == mode]
    if mode == "binary":
        items = [r["image"] for r in rows]
        done = {r["image"] for r in mine} & set(items)
        todo = [i for i, name in enumerate(items) if name not in done]
    else:
        index = {frozenset(g): i for i, g in enumerate(groups(rows, size, seed))}
        items = list(index.values())
        done = {index[frozenset(r["group"])] for r in mine if frozenset(r["group"]) in index}
        todo = [i for i in items if i not in done]
    return {"done": done, "total": len(items), "next": todo[0] if todo else None, "answers": len(mine)}


# ---- writing ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(folder: Path):
    """The labels file open for appending, held by this thread (and, where fcntl exists, this process)."""
    with _lock:
        with open(Path(folder) / LABELS, "a+b") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)


def _repair_tail(f) -> None:
    """Drop a garbled last line (left by a killed writer) so the next record does not land after it."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    start = max(0, end - (1 << 16))
    f.seek(start)
    tail = f.read()
    body = tail[:-1] if tail.endswith(b"\n") else tail
    cut = body.rfind(b"\n")
    if cut < 0 and start > 0:
        return  # one last line over 64 KiB: not ours to judge, leave it
    last = body[cut + 1:]
    if not last.strip() or _parse(last) is not None:
        if not tail.endswith(b"\n"):
            f.write(b"\n")
        return
    f.truncate(start + cut + 1)


def _manifest_images(folder: Path) -> set[str]:
    from erase.feedback.collect import read_collection

    return {r["image"] for r in read_collection(Path(folder))[1]}


def validate(record: dict, images: set[str] | None = None, records: list[dict] | None = None) -> dict:
    """Raise a UsageError saying what is wrong with `record`; `images` (names) and `records` (the file) if known."""
    if not isinstance(record, dict):
        raise UsageError("a label record must be a JSON object")
    kind = record.get("kind")
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    check_labeller(record.get("labeller"))
    extra = set(record) - _FIELDS[kind] - {"id", "labeller", "kind", "time"}
    if extra:
        raise UsageError(f"unknown field(s) in a {kind} record: {', '.join(sorted(extra))}")
    for key in ("id", "time"):
        if not isinstance(record.get(key, ""), str):
            raise UsageError(f"{key} must be a string")
    if "score" in record and (isinstance(record["score"], bool) or not isinstance(record["score"], (int, float))):
        raise UsageError("score must be a number")

    def known(name) -> None:
        if not isinstance(name, str) or (images is not None and name not in images):
            raise UsageError(f"{name!r} is not an image of this collection")

    if kind == "binary":
        known(record.get("image"))
        if not isinstance(record.get("harmful"), bool):
            raise UsageError("harmful must be true or false")
    elif kind == "rank":
        group, ranks = record.get("group"), record.get("ranks")
        if not isinstance(group, list) or not 2 <= len(group) <= MAX_GROUP:
            raise UsageError(f"group must be a list of 2-{MAX_GROUP} image names")
        for name in group:
            known(name)
        if len(set(group)) != len(group):
            raise UsageError("group names an image twice")
        if not isinstance(ranks, dict) or set(ranks) != set(group):
            raise UsageError("ranks must give every image of the group (and only those) a rank or \"exclude\"")
        given = [v for v in ranks.values() if v != "exclude"]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in given):
            raise UsageError("each rank must be a whole number 1.. or \"exclude\"")
        if len(given) < 2:
            raise UsageError("rank at least 2 images of the group")
        if sorted(given) != list(range(1, len(given) + 1)):
            raise UsageError(f"ranks must be 1..{len(given)}, each once (1 = most harmful), not {sorted(given)}")
    else:
        target = record.get("undoes")
        if not isinstance(target, str):
            raise UsageError("undoes must be the id of an answer")
        if records is not None:
            mine = {r["id"]: r for r in records if r["labeller"] == record["labeller"]}
            if mine.get(target, {}).get("kind") not in MODES:
                raise UsageError(f"{record['labeller']} has no answer with id {target}")
            if any(r["kind"] == "undo" and r["undoes"] == target for r in mine.values()):
                raise UsageError(f"answer {target} is already undone")
    return record


def _write(f, record: dict) -> None:
    f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


def _complete(record: dict) -> dict:
    full = {"id": record.get("id") or uuid.uuid4().hex}
    full.update({k: v for k, v in record.items() if k not in ("id", "time")})
    full["time"] = record.get("time") or now()
    return full


def append(folder: Path, record: dict, *, images: set[str] | None = None) -> dict:
    """Validate `record`, fill in id and time if absent, append it durably; the record as written.

    Image names are checked against `images`, or the folder's manifest when not given.
    """
    folder = Path(folder)
    if not isinstance(record, dict):
        raise UsageError("a label record must be a JSON object")
    record = _complete(record)
    validate(record, _manifest_images(folder) if images is None else images)
    with _locked(folder) as f:
        if record["kind"] == "undo":
            validate(record, images, read_records(folder))
        _repair_tail(f)
        _write(f, record)
    return record


def undo_latest(folder: Path, labeller: str) -> tuple[dict, dict] | None:
    """Undo `labeller`'s latest standing answer: (the undo record, the answer it undid), or None if none is left."""
    check_labeller(labeller)
    with _locked(folder) as f:
        mine = [r for r in answers(folder) if r["labeller"] == labeller]
        if not mine:
            return None
        undo = validate(_complete({"labeller": labeller, "kind": "undo", "undoes": mine[-1]["id"]}), records=read_records(folder))
        _repair_tail(f)
        _write(f, undo)
    return undo, mine[-1]
