"""Where each stage reads and writes, relative to one root.

The DVC pipeline uses the repository root; `tunepipe train cfg.yaml` uses the
config's `output_dir`, so both write the same tree and run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Layout:
        return cls(Path(root))

    @property
    def base_model(self) -> Path:
        return self.root / "models" / "base"

    @property
    def validated(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def tokenized(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def grown_tokenizer(self) -> Path:
        """The tokenizer the shards were made with, kept only when the vocabulary grew (new tokens)."""
        return self.tokenized / "tokenizer"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def adapter(self) -> Path:
        return self.root / "models" / "adapter"

    @property
    def full(self) -> Path:
        return self.root / "models" / "full"

    def trained(self, finetuning_type: str) -> Path:
        """The train stage's weights: a PEFT adapter for lora / oft, a full model otherwise."""
        return self.adapter if finetuning_type in ("lora", "oft") else self.full

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
