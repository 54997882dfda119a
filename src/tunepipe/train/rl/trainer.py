"""TRL's GRPOTrainer on our tokenized prompts, logging its completions to our MLflow run.

Two pieces of glue, each because TRL's trainer assumes what our pipeline does elsewhere:
- TRL tokenizes the `prompt` text itself; ours were tokenized by the tokenize stage (the
  chat template, turn by turn, as for every objective), so `_tokenize_prompts` hands back
  those ids instead of re-tokenizing a decoded text (which can merge tokens differently);
- TRL's completion tables go to wandb / trackio; ours go to the run's MLflow artifacts.
"""

from __future__ import annotations

import logging

from trl import GRPOTrainer

log = logging.getLogger(__name__)

TABLE_ROWS = 64  # completions per logged table: enough to read, small enough to stay an artifact


def prompt_dataset(dataset, tokenizer):
    """Our prompt shard as GRPOTrainer's rows: `prompt` (the rendered text, what TRL shows and
    passes to reward models), `reference` (the reference answer, passed to every reward) and
    `prompt_ids` (what generation starts from)."""
    def row(example):
        return {"prompt": tokenizer.decode(example["prompt_ids"], skip_special_tokens=False),
                "reference": example["label_text"]}
    # in memory: a cache file would land inside data/tokenized/, a DVC output of the tokenize stage
    return dataset.map(row, remove_columns=["label_text"], desc="prompts", keep_in_memory=True)


class PromptIdsGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that generates from the shards' `prompt_ids` and logs a completions table."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ids_of_prompt: dict[str, list[int]] = {}
        for dataset in (self.train_dataset, self.eval_dataset):
            if dataset is not None:
                for text, ids in zip(dataset["prompt"], dataset["prompt_ids"]):
                    self._ids_of_prompt.setdefault(text, list(ids))
        self.tracker = None

    def attach_tracker(self, callbacks, reward_file_hashes: dict[str, str]) -> None:
        """The session's MLflow run (from its tracking callback); tags it with the reward files' sha256."""
        for callback in callbacks:
            if hasattr(callback, "tracker"):
                self.tracker = callback.tracker
        if self.tracker is not None:
            self.tracker.set_tags({f"tunepipe.reward_file.{path}": digest for path, digest in reward_file_hashes.items()})

    def _tokenize_prompts(self, prompts: list):
        return [self._ids_of_prompt[text] for text in prompts], None, {}

    def _track_num_input_tokens(self, inputs):
        """TRL adds each rollout's prompt + completion tokens to num_input_tokens_seen itself; the
        Trainer's own count looks for input_ids in a batch that is a list of prompts."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training = self.model.training and "loss" in logs
        table = self.completions_table() if training else None
        super().log(logs, start_time)
        if table and self.tracker is not None:
            self.tracker.log_table(table, f"completions/step_{self.state.global_step:06d}.json")

    def completions_table(self) -> dict[str, list] | None:
        """The latest generation batch: prompt, completion, each reward, advantage (at most TABLE_ROWS)."""
        logs = self._logs
        count = min(len(logs["prompt"]), TABLE_ROWS)
        if not count:
            return None
        tail = slice(len(logs["prompt"]) - count, None)
        table = {"step": [self.state.global_step] * count,
                 "prompt": list(logs["prompt"])[tail], "completion": list(logs["completion"])[tail]}
        for name, values in logs["rewards"].items():
            table[f"reward/{name}"] = list(values)[tail]
        table["advantage"] = list(logs["advantages"])[tail]
        return table
