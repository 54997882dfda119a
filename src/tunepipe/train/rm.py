"""`stage: rm`: a reward model (scoring text with it lives in tunepipe/scoring.py).

The reward model is the base with a scalar value head: transformers'
`AutoModelForSequenceClassification` with one label, built from the causal LM
checkpoint (the head is new; with LoRA it is trained in full and saved with the
adapter as a `modules_to_save` module). The reward of a sequence is the head's output
at its last token; the pairwise loss is -log sigmoid(r_chosen - r_rejected).

Training runs through TRL's RewardTrainer: unlike TRL's DPO and KTO trainers it takes
pre-tokenized `chosen_ids` / `rejected_ids` columns as they are, so our shards need
only a column rename. It adds the same `rewards/*` metrics the other objectives log.
"""

from __future__ import annotations

import logging

from trl import RewardTrainer

from tunepipe.train.pref_common import reward_metrics

log = logging.getLogger(__name__)


def reward_dataset(dataset):
    """Our preference shard as RewardTrainer's tokenized columns (labels are not used: the
    reward scores the whole sequence, prompt included)."""
    dataset = dataset.remove_columns([c for c in ("chosen_labels", "rejected_labels") if c in dataset.column_names])
    return dataset.rename_columns({"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"})


class RewardModelTrainer(RewardTrainer):
    """TRL's RewardTrainer, also logging rewards/chosen, rejected, margins, accuracies."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        chosen, rejected = outputs.logits.squeeze(-1).detach().chunk(2)
        for name, (total, count) in reward_metrics(chosen, rejected).items():
            self._metrics[mode][name].append(total / max(count, 1))
        for duplicate in ("accuracy", "margin"):  # TRL's names for rewards/accuracies, rewards/margins
            self._metrics[mode].pop(duplicate, None)
        return (loss, outputs) if return_outputs else loss
