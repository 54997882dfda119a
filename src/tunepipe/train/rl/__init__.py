"""Online reinforcement learning: the policy writes its own answers and a reward scores them.

- `grpo`: `stage: grpo`, TRL's GRPOTrainer on our prompt shards (`trainer` holds the glue);
- the rewards (`train.reward_funcs`) live in core, `tunepipe.rewards`, because the evaluate
  stage scores its answers with the same functions without importing the training stack.

Each objective module exposes `train(cfg, layout)`, dispatched by `tunepipe.train.run_train`.
"""
