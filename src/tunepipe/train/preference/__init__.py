"""Preference objectives: learning from chosen / rejected pairs, good / bad labels, or a score.

- `dpo`: the DPO family (sigmoid DPO, IPO, ORPO, SimPO, ...) through TRL's DPOTrainer on our
  pre-tokenized pairs; `losses` holds the per-variant loss formulas, `ref_cache` the reference
  model's log-probs computed once;
- `kto`: KTO on desirable / undesirable rows;
- `rm`: a reward model (a scalar head trained on pairs);
- `data` / `common`: the pair batches and the set-up the three share.

Each objective module exposes `train(...)`, dispatched by `tunepipe.train.run_train` on `train.stage`.
"""
