"""A vision-language model's images at evaluation: the forward inputs of eval rows and prompts.

The shards keep each row's media references (`media`, JSON), never pixels; here they become
the family's processor inputs for exactly the rows of a batch, padded as the batch is
(`data.vision.MediaTokens.model_inputs`: pixel values, image grids, the image-token mask the
model derives its 3-D positions from), the same way the training collator does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunepipe.config import Config
from tunepipe.data.sources.media import MEDIA_STORE
from tunepipe.data.vision import MediaTokens
from tunepipe.evaluate.lm_metrics import padded


@dataclass
class EvalImages:
    """The images of one eval split's rows, for loss / log-prob batches and for generation."""

    media: MediaTokens
    dataset: object
    pad_id: int

    @classmethod
    def load(cls, cfg: Config, dataset, tokenizer, base_dir: Path, tokenized: Path) -> EvalImages:
        """The images of `dataset` (a split of the shards in `tokenized`, beside their media store)."""
        from tunepipe.models.base import follow_manifest

        media = MediaTokens.for_data(follow_manifest(base_dir), tokenizer, cfg.data, tokenized / MEDIA_STORE)
        return cls(media, dataset, tokenizer.pad_token_id)

    def __call__(self, column: str):
        """indices -> the images' inputs of those rows, their ids taken from `column` (`input_ids`, or
        `chosen_input_ids` / `rejected_input_ids` of pairs, which share their images), right-padded
        as `lm_metrics` pads them."""
        def inputs(indices: list[int]) -> dict:
            rows = [self.dataset[i] for i in indices]
            ids, _ = padded([row[column] for row in rows], self.pad_id)
            return self.media.batch_inputs(ids, [row["media"] for row in rows])
        return inputs

    def prompts(self, examples: list):
        """(indices, left-padded prompt ids) -> the images' inputs of those generation examples."""
        return lambda indices, ids: self.media.batch_inputs(ids, [examples[i].media for i in indices])
