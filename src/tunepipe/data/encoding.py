"""Canonical rows -> token ids and labels, for each objective.

Conversations are rendered with the chat template (`templates.ChatFormat`) and the
whole rendered text is tokenized in one batch call of the fast tokenizer, so
`input_ids` equal `apply_chat_template(conversation)`. The label boundaries come from
rendering prefixes of the conversation (everything before an answer, with the
generation prompt; everything up to the end of that answer) and checking that their
tokens are a prefix of the full sequence; a template for which that is not true is an
error naming the row, never a silently wrong mask.

Labels: -100 on prompt tokens; every assistant-side answer (its end-of-turn token
included) is trained, only the last with `mask_history`, everything with
`train_on_prompt`. The first label of every sample is -100 too: nothing inside the
sample predicts its first token, and keeping it out makes a packed row's labels the
exact concatenation of its samples' labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunepipe.config import DataConfig
from tunepipe.data.batching import BatchEncoder, pipelined
from tunepipe.data.prefix_ids import PrefixResolver
from tunepipe.data.templates import ChatFormat
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


# -- sft / kto --------------------------------------------------------------------


def encode_conversations(rows: list[dict], fmt: ChatFormat, data: DataConfig, kind: str,
                         eval_columns: bool, stats: Stats) -> dict[str, list]:
    """SFT (every answer trained) or KTO (the last answer only) rows -> columns."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    if eval_columns:
        columns.update(prompt_ids=[], label_text=[])
    if kind == "kto":
        columns["kto_tag"] = []
    encoder = BatchEncoder(fmt.tokenizer)
    resolver = PrefixResolver(fmt.tokenizer, encoder)
    last_only = kind == "kto" or data.mask_history

    def prepare(chunk: list[dict]):
        fulls: list[str] = []
        requests: list[tuple[int, str]] = []
        bounds = [plan_row(row, fmt, kind, fulls, requests) for row in chunk]
        return (fulls, requests, bounds), fulls

    def finish(chunk: list[dict], state, full_ids: list[list[int]]) -> None:
        fulls, requests, bounds = state
        ends = resolver.prefix_lengths(fulls, full_ids, requests)
        for full, row, row_bounds in zip(full_ids, chunk, bounds):
            spans = [(checked(ends[p], row, f"the prompt of answer {k + 1}", fmt),
                      len(full) if e is None else checked(ends[e], row, f"the conversation up to answer {k + 1}", fmt))
                     for k, (p, e) in enumerate(row_bounds)]
            stats.rows_in += 1
            sample = build_sample(full, spans, data, last_only, stats)
            if sample is None:
                continue
            columns["input_ids"].append(sample[0])
            columns["labels"].append(sample[1])
            if eval_columns:
                columns["prompt_ids"].append(full[:spans[-1][0]])
                columns["label_text"].append(row["messages"][-1]["content"])
            if kind == "kto":
                columns["kto_tag"].append(bool(row["kto_tag"]))

    pipelined(rows, f"tokenize {kind}", encoder, prepare, finish)
    return columns


def checked(end: int | None, row: dict, what: str, fmt: ChatFormat) -> int:
    if end is None:
        raise TunepipeError(
            f"{row.get('_source', 'a row')}: {what} is not a token prefix of the whole conversation "
            f"rendered with the {fmt.name} chat template, so the prompt tokens cannot be masked exactly",
            hint="the template renders earlier turns differently once later turns follow; "
                 "pick another data.template (chatml, llama3, qwen, alpaca, default)")
    return end


def plan_row(row: dict, fmt: ChatFormat, kind: str, fulls: list[str], requests: list[tuple[int, str]]):
    """Queue the texts one row needs: its full chat, and per trained answer the prompt before it
    and the chat up to its end (None: the end of the full chat). Returns request indices."""
    import jinja2

    try:
        chat = fmt.chat(row)
        if not chat.answers:
            raise TunepipeError(f"{row.get('_source', 'a row')}: no assistant answer to train on")
        row_index, count = len(fulls), len(chat.messages)
        fulls.append(fmt.render(chat))
        bounds = []
        for j in chat.answers[-1:] if kind == "kto" else chat.answers:
            requests.append((row_index, fmt.render(chat, j, add_generation_prompt=True)))
            end = None
            if j != count - 1:
                requests.append((row_index, fmt.render(chat, j + 1)))
                end = len(requests) - 1
            bounds.append((len(requests) - (2 if end is not None else 1), end))
    except jinja2.TemplateError as exc:
        raise TunepipeError(f"{row.get('_source', 'a row')}: the {fmt.name} chat template failed: {exc}") from None
    return bounds


def build_sample(full: list[int], spans: list[tuple[int, int]], data: DataConfig, last_only: bool,
                 stats: Stats) -> tuple[list[int], list[int]] | None:
    """Labels from the answer spans, truncated by LLaMA-Factory's policy (or dropped)."""
    cutoff = data.cutoff_len
    if len(full) > cutoff and data.overlong == "drop":
        stats.dropped_overlong += 1
        return None
    pairs, previous = [], 0
    for start, end in spans:
        pairs.append((full[previous:start], full[start:end]))
        previous = end
    trailing = full[previous:]
    if len(full) > cutoff:
        pairs, trailing = truncate_pairs(pairs, trailing, cutoff, reverse=data.mask_history)
        stats.truncated += 1
    input_ids, labels = [], []
    last = len(pairs) - 1
    for k, (source, target) in enumerate(pairs):
        input_ids += source
        input_ids += target
        labels += source if data.train_on_prompt else [IGNORE] * len(source)
        labels += target if (k == last or not last_only) else [IGNORE] * len(target)
    input_ids += trailing
    labels += trailing if data.train_on_prompt else [IGNORE] * len(trailing)
    trained = trained_tokens(pairs, trailing, data.train_on_prompt, last_only)
    if labels and labels[0] != IGNORE:
        labels[0] = IGNORE
        trained -= 1
    if trained <= 0:
        stats.dropped_no_labels += 1
        return None
    stats.rows_out += 1
    stats.lengths.append(len(input_ids))
    return input_ids, labels


def trained_tokens(pairs, trailing, train_on_prompt: bool, last_only: bool) -> int:
    last = len(pairs) - 1
    count = sum(len(t) for k, (_, t) in enumerate(pairs) if k == last or not last_only)
    if train_on_prompt:
        count += sum(len(source) for source, _ in pairs) + len(trailing)
    return count


def truncate_pairs(pairs: list[tuple[list, list]], trailing: list, cutoff: int, reverse: bool):
    """Fit (prompt, answer) pairs into `cutoff` tokens pair by pair, each keeping its head
    (LLaMA-Factory's policy); with `reverse` the last pairs get the budget first."""
    kept: dict[int, tuple[list, list]] = {}
    total = 0
    order = range(len(pairs) - 1, -1, -1) if reverse else range(len(pairs))
    for k in order:
        if total >= cutoff:
            break
        source, target = pairs[k]
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff - total)
        kept[k] = (source[:source_len], target[:target_len])
        total += source_len + target_len
    return [kept[k] for k in sorted(kept)], trailing[:max(cutoff - total, 0)]


# -- preference ---------------------------------------------------------------------


def encode_preference(rows: list[dict], fmt: ChatFormat, data: DataConfig, stats: Stats) -> dict[str, list]:
    """Preference rows -> chosen/rejected ids, both sharing the prompt, prompt labels -100."""
    names = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    columns: dict[str, list] = {name: [] for name in names}
    encoder = BatchEncoder(fmt.tokenizer)
    resolver = PrefixResolver(fmt.tokenizer, encoder)

    def prepare(chunk: list[dict]):
        fulls, requests = [], []
        for row in chunk:
            chosen, rejected = fmt.chat(row, row["chosen"]), fmt.chat(row, row["rejected"])
            prompt = fmt.render(chosen, chosen.answers[-1], add_generation_prompt=True)
            requests += [(len(fulls), prompt), (len(fulls) + 1, prompt)]
            fulls += [fmt.render(chosen), fmt.render(rejected)]
        return (fulls, requests), fulls

    def finish(chunk: list[dict], state, full_ids: list[list[int]]) -> None:
        fulls, requests = state
        ends = resolver.prefix_lengths(fulls, full_ids, requests)
        for i, row in enumerate(chunk):
            chosen_full, rejected_full = full_ids[2 * i], full_ids[2 * i + 1]
            n = checked(ends[2 * i], row, "the prompt (before chosen)", fmt)
            checked(ends[2 * i + 1], row, "the prompt (before rejected)", fmt)
            stats.rows_in += 1
            pair = build_pair(chosen_full[:n], chosen_full[n:], rejected_full[n:], data, stats)
            if pair is not None:
                for name, value in zip(names, pair):
                    columns[name].append(value)

    pipelined(rows, "tokenize preference", encoder, prepare, finish)
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
