"""Batched generation for the eval prompts: left padding, the `eval` group's decoding knobs.

Left padding keeps every prompt's last token at the same position, so one `generate`
call continues all of them; the attention mask hides the padding and transformers
derives position ids from it, so a batched answer equals the unbatched one. A
vision-language model's prompts carry their images (`Example.media`, the shards' media
references): `generate` passes their pixels with the left-padded ids, and the model
derives its 3-D rotary positions from the mask and the image grid, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunepipe.config import EvalConfig
from tunepipe.data.chat.chat_format import stop_token_ids
from tunepipe.evaluate.lm_metrics import IGNORE_INDEX, batched, model_device, padded


@dataclass(frozen=True)
class Example:
    """One eval prompt: its token ids (ending with the generation prompt) and the reference answer."""

    prompt_ids: list[int]
    label: str
    media: str | None = None  # a vision-language row's media references (JSON, as the shards hold them)


def generation_examples(dataset, tokenizer, limit: int | None) -> list[Example]:
    """Prompts and references from eval rows, whatever their objective.

    SFT rows carry `prompt_ids` / `label_text`. Preference and KTO rows do not, but their
    prompt is the leading `-100` run of the labels and the answer the labelled tokens
    (the chosen one for pairs, desirable rows only for KTO). Pretraining rows have no
    prompt and give no examples.
    """
    columns = set(dataset.column_names)
    examples: list[Example] = []
    for row in dataset:
        if limit is not None and len(examples) >= limit:
            break
        if "prompt_ids" in columns:
            examples.append(Example(list(row["prompt_ids"]), row["label_text"], row.get("media")))
            continue
        if "kto_tag" in columns and not row["kto_tag"]:
            continue
        ids, labels = _answer_columns(row, columns)
        example = _split_at_answer(ids, labels, tokenizer, row.get("media"))
        if example is not None:
            examples.append(example)
    return examples


def _answer_columns(row, columns):
    if "chosen_input_ids" in columns:
        return row["chosen_input_ids"], row["chosen_labels"]
    return row["input_ids"], row["labels"]


def _split_at_answer(ids, labels, tokenizer, media: str | None = None) -> Example | None:
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if not start:  # no prompt (pretraining text) or no answer
        return None
    answer = [label for label in labels[start:] if label != IGNORE_INDEX]
    return Example(list(ids[:start]), tokenizer.decode(answer, skip_special_tokens=True).strip(), media)


def generate(model, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig, batch_size: int,
             seed: int, desc: str = "generate", stop_words: tuple[str, ...] = (),
             image_inputs=None) -> list[str]:
    """Decoded answers (special tokens dropped) for each prompt, in order; generation stops at the
    EOS / end-of-turn token and at `stop_words` (a named template's). `image_inputs(indices, ids)`:
    the images' forward inputs of those prompts, left-padded into `ids` (a vision-language model)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    set_seed(seed)  # sampling (do_sample) repeats exactly on the same params
    device = model_device(model)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None), stop_words)
    answers: list[str] = []
    for index in tqdm(list(batched(len(prompts), batch_size)), desc=desc, unit="batch"):
        ids, mask = padded([prompts[i] for i in index], tokenizer.pad_token_id, left=True)
        images = {key: value.to(device) for key, value in (image_inputs(list(index), ids) if image_inputs
                                                           else {}).items()}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), **images,
                max_new_tokens=eval_cfg.max_new_tokens, do_sample=eval_cfg.do_sample,
                **sampling_kwargs(eval_cfg), **decoding_kwargs(eval_cfg), eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[:, ids.shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=eval_cfg.skip_special_tokens)
        answers.extend(text.strip() for text in texts)
    return answers


def decoding_kwargs(eval_cfg: EvalConfig, beams: bool = True) -> dict:
    """LLaMA-Factory's decoding knobs for `generate` (num_beams only where `beams`: a streamed
    chat answer cannot come from beam search)."""
    kwargs = {"repetition_penalty": eval_cfg.repetition_penalty}
    if beams and eval_cfg.num_beams > 1:  # length_penalty only scores beams: passing it alone warns
        kwargs.update(num_beams=eval_cfg.num_beams, length_penalty=eval_cfg.length_penalty)
    return kwargs


def sampling_kwargs(eval_cfg: EvalConfig) -> dict:
    # Passing temperature/top_p with greedy decoding makes transformers warn on every call.
    if not eval_cfg.do_sample:
        return {"temperature": None, "top_p": None, "top_k": None}
    return {"temperature": eval_cfg.temperature, "top_p": eval_cfg.top_p, "top_k": eval_cfg.top_k}
