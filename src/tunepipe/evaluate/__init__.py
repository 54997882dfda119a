"""Evaluation: did the fine-tune help? (the evaluate stage and `tunepipe eval` / `tunepipe score`).

Entry point `run.run_evaluate`: the tuned model and its base scored side by side, teacher-forced
(`lm_metrics`: loss, perplexity, token accuracy) and generated (`generation` + `gen_metrics`: ROUGE,
BLEU, identity accuracy), preference margins for preference-tuned models (`pref_metrics`) and
pairwise accuracy for reward models (`reward`, `scoring`). `outputs` writes the report and logs it
into the train stage's MLflow run.
"""
