"""Online reinforcement learning: the policy writes its own answers and a reward scores them.

- `grpo`: `stage: grpo`, TRL's GRPOTrainer on our prompt shards (`trainer` holds the glue);
- `rewards`: what `train.reward_funcs` names (built-ins, `configs/rewards/FILE.py:function`,
  a `stage: rm` reward model), checked so a broken reward is named before generation.

Each objective module exposes `train(cfg, layout)`, dispatched by `tunepipe.train.run_train`.
"""
