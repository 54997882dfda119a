"""Canonical rows -> token ids and labels, for each objective.

`templates.ChatFormat` turns a row into alternating prompt / answer turns, each a list
of texts and token ids; every text is tokenized on its own (one batch call of the fast
tokenizer per chunk of rows) and the ids are concatenated. A turn boundary is therefore
also a token boundary: no token spans a prompt and its answer (docs/architecture.md,
"Turns"), and the label mask is exact by construction, with nothing to verify.

Labels: -100 on prompt tokens; every assistant-side answer (its end-of-turn token
included) is trained, only the last with `mask_history`, everything with
`train_on_prompt`. The first label of every sample is -100 too: nothing inside the
sample predicts its first token, and keeping it out makes a packed row's labels the
exact concatenation of its samples' labels. Truncation and the `efficient_eos`
templates follow LLaMA-Factory's supervised / pairwise / feedback processors, so a
named template gives LLaMA-Factory's ids and labels (bench/template_parity.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tunepipe.config import DataConfig
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.tokenizing.batching import BatchEncoder, pipelined
from tunepipe.errors import TunepipeError

IGNORE = -100


@dataclass
class Stats:
    rows_in: int = 0
    rows_out: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0
    lengths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        n = len(self.lengths)
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "truncated": self.truncated,
                "dropped": self.dropped_overlong + self.dropped_no_labels,
                "dropped_overlong": self.dropped_overlong, "dropped_no_labels": self.dropped_no_labels,
                "tokens": sum(self.lengths), "mean_length": round(sum(self.lengths) / n, 2) if n else 0.0,
                "max_length": max(self.lengths, default=0)}


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's truncation budget for one (prompt, answer) pair: a short answer keeps
    all of itself, a short prompt keeps all of itself, otherwise both shrink in proportion."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


# -- turns -> ids ------------------------------------------------------------------


def turn_ids(turns_per_row: list[list[list]], ids_of: dict[str, list[int]]) -> list[list[list[int]]]:
    """Each row's turns as id lists: texts looked up in `ids_of`, ids kept as they are."""
    return [[[i for element in turn for i in (ids_of[element] if isinstance(element, str) else (element,))]
             for turn in turns] for turns in turns_per_row]


def texts_of(turns_per_row: list[list[list]]) -> list[str]:
    """The distinct non-empty texts to tokenize (template boilerplate repeats on every row)."""
    return list(dict.fromkeys(element for turns in turns_per_row for turn in turns for element in turn
                              if isinstance(element, str) and element))


def encoded_turns(encoder: BatchEncoder, prepare_turns, desc: str, rows: list[dict], finish_row) -> None:
    """Render each chunk's turns, tokenize its texts in a worker thread, hand each row's ids on."""
    def prepare(chunk: list[dict]):
        turns = [prepare_turns(row) for row in chunk]
        texts = texts_of(turns)
        return (turns, texts), texts

    def finish(chunk: list[dict], state, ids: list[list[int]]) -> None:
        turns, texts = state
        ids_of = dict(zip(texts, ids))
        ids_of[""] = []
        for row, row_turns in zip(chunk, turn_ids(turns, ids_of)):
            finish_row(row, row_turns)

    pipelined(rows, desc, encoder, prepare, finish)


def pairs_of(turns: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) pairs; a trailing prompt without an answer gets an empty answer."""
    return [(turns[i], turns[i + 1] if i + 1 < len(turns) else []) for i in range(0, len(turns), 2)]


def one_turn(turns: list[list[int]]) -> tuple[list[int], list[int]]:
    """Everything before the last answer as one prompt, and that answer."""
    return [i for turn in turns[:-1] for i in turn], turns[-1]


# -- sft / kto --------------------------------------------------------------------


def encode_conversations(rows: list[dict], fmt: ChatFormat, data: DataConfig, kind: str,
                         eval_columns: bool, stats: Stats) -> dict[str, list]:
    """SFT (every answer trained) or KTO (the last answer, after the whole conversation as its
    prompt) rows -> columns."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    if eval_columns:
        columns.update(prompt_ids=[], label_text=[])
    if kind == "kto":
        columns["kto_tag"] = []
    if fmt.media is not None:
        columns["media"] = []
    if data.train_on_prompt and fmt.efficient_eos:
        raise TunepipeError(f"data.train_on_prompt=true does not work with template {fmt.name} "
                            "(its answers end at the next prompt's first token, as in LLaMA-Factory)")
    eos = fmt.tokenizer.eos_token_id if fmt.efficient_eos else None
    history_thoughts = kind != "kto" and not data.mask_history

    def prepare_turns(row: dict) -> list[list]:
        if not any(turn["role"] in ("assistant", "function_call") for turn in row["messages"]):
            raise TunepipeError(f"{row.get('_source', 'a row')}: no assistant answer to train on")
        return fmt.turns(row, history_thoughts=history_thoughts)

    def finish_row(row: dict, turns: list[list[int]]) -> None:
        stats.rows_in += 1
        if (row.get("images") or row.get("videos")) and sum(map(len, turns)) + (eos is not None) > data.cutoff_len:
            stats.dropped_overlong += 1  # cutting into an image's tokens would leave the model half an image
            return
        if kind == "kto":
            prompt, answer = one_turn(turns)
            sample = build_sample([(prompt, answer + ([eos] if eos is not None else []))], data, stats)
        else:
            sample = build_sample(pairs_of(turns), data, stats, eos=eos)
        if sample is None:
            return
        columns["input_ids"].append(sample[0])
        columns["labels"].append(sample[1] if fmt.media is None else fmt.media.mask(*sample))
        if fmt.media is not None:
            columns["media"].append(media_column(row))
        if eval_columns:
            columns["prompt_ids"].append(one_turn(turns)[0])
            columns["label_text"].append(row["messages"][-1]["content"])
        if kind == "kto":
            columns["kto_tag"].append(bool(row["kto_tag"]))

    encoded_turns(BatchEncoder(fmt.tokenizer), prepare_turns, f"tokenize {kind}", rows, finish_row)
    return columns


def build_sample(pairs: list[tuple[list[int], list[int]]], data: DataConfig, stats: Stats,
                 eos: int | None = None) -> tuple[list[int], list[int]] | None:
    """Ids and labels from (prompt, answer) pairs, each pair cut by LLaMA-Factory's policy in
    turn order (the last turns first with mask_history), or the row dropped (overlong: drop).
    `eos`: the efficient-EOS templates' single closing EOS (trained), also the first label of
    every later prompt."""
    cutoff, reverse = data.cutoff_len, data.mask_history
    length = sum(len(s) + len(t) for s, t in pairs) + (eos is not None)
    if length > cutoff and data.overlong == "drop":
        stats.dropped_overlong += 1
        return None
    input_ids, labels, total = [], [], int(eos is not None)
    for k, (source, target) in enumerate(pairs[::-1] if reverse else pairs):
        if total >= cutoff:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        if data.train_on_prompt:
            source_labels = source
        elif eos is not None and k != 0 and source:
            source_labels = [eos] + [IGNORE] * (len(source) - 1)
        else:
            source_labels = [IGNORE] * len(source)
        target_labels = [IGNORE] * len(target) if (reverse and k != 0) else target
        if reverse:
            input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
    if eos is not None:
        input_ids, labels = input_ids + [eos], labels + [eos]
    if len(input_ids) < length:
        stats.truncated += 1
    if labels and labels[0] != IGNORE:
        labels[0] = IGNORE
    if all(label == IGNORE for label in labels):
        stats.dropped_no_labels += 1
        return None
    stats.rows_out += 1
    stats.lengths.append(len(input_ids))
    return input_ids, labels


def media_column(row: dict) -> str:
    """A sample's media references as the shards keep them (JSON text): paths and hashes, never pixels."""
    media = {"images": row.get("images") or []}
    if row.get("videos"):  # image-only rows keep their shards' bytes as before videos were read
        media["videos"] = row["videos"]
    return json.dumps(media, sort_keys=True)


# -- preference ---------------------------------------------------------------------


def encode_preference(rows: list[dict], fmt: ChatFormat, data: DataConfig, stats: Stats) -> dict[str, list]:
    """Preference rows -> chosen/rejected ids, both sharing the prompt, prompt labels -100."""
    names = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    columns: dict[str, list] = {name: [] for name in names}
    if fmt.media is not None:  # both answers read the prompt's images (train/preference/data.py)
        columns["media"] = []
    eos = [fmt.tokenizer.eos_token_id] if fmt.efficient_eos else []

    def prepare_turns(row: dict) -> list[list]:
        chosen = fmt.turns(row, row["chosen"], history_thoughts=False)
        return chosen + fmt.turns(row, row["rejected"], history_thoughts=False)[-1:]

    def finish_row(row: dict, turns: list[list[int]]) -> None:
        stats.rows_in += 1
        prompt, chosen = one_turn(turns[:-1])
        if row.get("images") and len(prompt) + max(len(chosen), len(turns[-1])) + len(eos) > data.cutoff_len:
            stats.dropped_overlong += 1  # a cut would leave the model half an image (as for SFT rows)
            return
        pair = build_pair(prompt, chosen + eos, turns[-1] + eos, data, stats)
        if pair is not None:
            for name, value in zip(names, pair):
                columns[name].append(value)
            if fmt.media is not None:
                columns["media"].append(media_column(row))

    encoded_turns(BatchEncoder(fmt.tokenizer), prepare_turns, "tokenize preference", rows, finish_row)
    return columns


def build_pair(prompt: list[int], chosen: list[int], rejected: list[int], data: DataConfig, stats: Stats):
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > data.cutoff_len:
        if data.overlong == "drop":
            stats.dropped_overlong += 1
            return None
        source_len, target_len = infer_seqlen(len(prompt), longest, data.cutoff_len)
        prompt, chosen, rejected = prompt[:source_len], chosen[:target_len], rejected[:target_len]
        stats.truncated += 1
    if not chosen or not rejected:
        stats.dropped_no_labels += 1
        return None
    masked = [IGNORE] * len(prompt)
    chosen_labels, rejected_labels = masked + chosen, masked + rejected
    chosen_labels[0] = rejected_labels[0] = IGNORE
    stats.rows_out += 1
    stats.lengths.append(len(prompt) + max(len(chosen), len(rejected)))
    return prompt + chosen, chosen_labels, prompt + rejected, rejected_labels


# -- prompts (online RL) --------------------------------------------------------------

PROMPT_COLUMNS = ("prompt_ids", "label_text")


def encode_prompts(rows: list[dict], fmt: ChatFormat, data: DataConfig, stats: Stats) -> dict[str, list]:
    """Online-RL rows (`stage: grpo`): the conversation up to its last answer, rendered with the
    generation prompt, as `prompt_ids`; the last answer's text, the reference the reward
    functions compare with, as `label_text`. The policy writes its own answer, so a prompt is
    never cut: one longer than cutoff_len is dropped (a head cut would lose the generation
    prompt the completion starts from)."""
    columns: dict[str, list] = {name: [] for name in PROMPT_COLUMNS}

    def prepare_turns(row: dict) -> list[list]:
        if row["messages"][-1]["role"] != "assistant":
            raise TunepipeError(f"{row.get('_source', 'a row')}: stage grpo needs a last assistant turn "
                                "(the reference answer the rewards compare with)")
        return fmt.turns(row, history_thoughts=False)

    def finish_row(row: dict, turns: list[list[int]]) -> None:
        stats.rows_in += 1
        prompt = one_turn(turns)[0]
        if len(prompt) > data.cutoff_len:
            stats.dropped_overlong += 1
            return
        stats.rows_out += 1
        stats.lengths.append(len(prompt))
        columns["prompt_ids"].append(prompt)
        columns["label_text"].append(row["messages"][-1]["content"])

    encoded_turns(BatchEncoder(fmt.tokenizer), prepare_turns, "tokenize prompts", rows, finish_row)
    return columns
