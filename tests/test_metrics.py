"""Metric definitions: ROUGE / BLEU on strings with hand-computed values, loss / perplexity /
token accuracy against the model's own loss, batched generation, chat template parts, rewards."""

from __future__ import annotations

import math

import pytest
import torch

from tests.fixtures.adapters import QUESTIONS, pair_row, sft_row
from tunepipe.config import EvalConfig, TrainConfig
from tunepipe.data.chat.chat_format import TurnFormat, end_of_turn_token, stop_token_ids, turn_format
from tunepipe.evaluate.gen_metrics import corpus_scores, identity_accuracy, score_tokens
from tunepipe.evaluate.generation import generate
from tunepipe.evaluate.lm_metrics import sequence_logps, token_metrics
from tunepipe.evaluate.pref_metrics import preference_metrics


def test_english_scores_match_hand_computed_values():
    scores = corpus_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    # 5 of 6 unigrams shared; bigrams the-cat, on-the, the-mat: 3 of 5; LCS "the cat on the mat": 5.
    assert scores["rouge-1"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    # BLEU-4: precisions 5/6, 3/5, 1/4 (on-the-mat) and 0/3 smoothed by method 3 to 1/(2*3);
    # equal lengths, so no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert scores["bleu-4"] == pytest.approx(100 * expected, abs=1e-3)


def test_chinese_is_scored_per_character():
    scores = corpus_scores(["我爱北京"], ["我爱上海"])
    assert scores["rouge-1"] == pytest.approx(50.0)  # 我 爱 shared of 4
    assert scores["rouge-2"] == pytest.approx(100 / 3, abs=1e-3)  # 我爱 of 3 bigrams
    assert scores["rouge-l"] == pytest.approx(50.0)
    expected = (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25  # trigrams 0/2 -> 1/(2*2), 4-grams 0/1 -> 1/(4*1)
    assert scores["bleu-4"] == pytest.approx(100 * expected, abs=1e-3)


def test_identical_answers_score_100_and_empty_answers_score_0():
    same = corpus_scores(["Paris是法国的首都。", "Hello, big wide world!"], ["Paris是法国的首都。", "hello big wide world"])
    assert all(value == pytest.approx(100.0) for value in same.values())
    # Sentence BLEU-4 of an answer shorter than 4 tokens is below 100 even when exact: it has
    # no 4-gram to match (NLTK's and LLaMA-Factory's behaviour, kept for comparable numbers).
    short = corpus_scores(["hello world"], ["hello world"])
    assert short["rouge-1"] == pytest.approx(100.0) and short["bleu-4"] < 100.0
    empty = corpus_scores(["", "..."], ["我爱上海", "words"])
    assert all(value == 0.0 for value in empty.values())


def test_scores_average_over_samples():
    pair = corpus_scores(["a b c d", "x"], ["a b c d", "y"])
    assert pair["rouge-1"] == pytest.approx(50.0)


def test_score_tokens_split_cjk_characters_and_keep_other_words():
    assert score_tokens("Paris是首都, The café!") == ["paris", "是", "首", "都", "the", "café"]
    assert score_tokens("こんにちは世界") == list("こんにちは世界")


def test_identity_accuracy_is_case_insensitive_fraction():
    answers = ["I am TUNEY.", "I'm SmolLM.", "tuney here", "call me Tunie"]
    assert identity_accuracy(answers, ["Tuney"]) == 0.5
    assert identity_accuracy(answers, ["tuney", "smollm"]) == 0.75


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunepipe.models.base import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_eval_loss_equals_the_models_loss_and_perplexity_its_exp(tiny):
    model, tokenizer = tiny
    rows = [sft_row(tokenizer, q, a) for q, a in QUESTIONS[:3]]
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    one = token_metrics(model, ids[:1], labels[:1], tokenizer.pad_token_id)
    with torch.no_grad():
        hf_loss = model(input_ids=torch.tensor([ids[0]]), labels=torch.tensor([labels[0]])).loss.item()
    assert one["eval_loss"] == pytest.approx(hf_loss, rel=1e-5)
    batched = token_metrics(model, ids, labels, tokenizer.pad_token_id, batch_size=2)
    assert batched["perplexity"] == pytest.approx(math.exp(batched["eval_loss"]), rel=1e-9)
    # Token-weighted over the split: the mean of per-row losses weighted by their token counts.
    per_row = [token_metrics(model, [i], [lab], tokenizer.pad_token_id) for i, lab in zip(ids, labels)]
    tokens = sum(m["eval_tokens"] for m in per_row)
    weighted = sum(m["eval_loss"] * m["eval_tokens"] for m in per_row) / tokens
    assert batched["eval_tokens"] == tokens
    assert batched["eval_loss"] == pytest.approx(weighted, rel=1e-5)
    correct = sum(m["token_accuracy"] * m["eval_tokens"] for m in per_row)
    assert batched["token_accuracy"] == pytest.approx(correct / tokens)


def test_token_accuracy_is_one_when_labels_are_the_models_own_argmax(tiny):
    model, tokenizer = tiny
    prompt = sft_row(tokenizer, "Who are you?", "x")["prompt_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0].tolist()
    labels = [-100] * len(prompt) + greedy[len(prompt):]
    metrics = token_metrics(model, [greedy], [labels], tokenizer.pad_token_id)
    assert metrics["token_accuracy"] == 1.0 and metrics["eval_tokens"] == 5


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from tests.fixtures.adapters import make_adapter
    from tunepipe.models.base import load_causal_lm

    _, tokenizer = tiny
    # The random tiny model ends every answer at once; a strong adapter makes it talk.
    # (A fresh base: PEFT injects its layers into the model it wraps.)
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", scale=1.0)
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(adapter)).eval()
    prompts = [sft_row(tokenizer, q, a)["prompt_ids"] for q, a in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    cfg = EvalConfig(max_new_tokens=6)
    batched = generate(model, tokenizer, prompts, cfg, batch_size=4, seed=0)
    single = [generate(model, tokenizer, [p], cfg, batch_size=1, seed=0)[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_sequence_logps_sum_the_label_tokens(tiny):
    model, tokenizer = tiny
    row = sft_row(tokenizer, "Who are you?", "I am Tuney.")
    [(total, count)] = sequence_logps(model, [row["input_ids"]], [row["labels"]], tokenizer.pad_token_id)
    metrics = token_metrics(model, [row["input_ids"]], [row["labels"]], tokenizer.pad_token_id)
    assert count == metrics["eval_tokens"]
    assert -total / count == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_dpo_rewards_are_beta_times_log_ratio_to_the_base():
    cfg = TrainConfig(stage="dpo", pref_beta=0.5)
    tuned = {"chosen": [(-2.0, 2), (-4.0, 4)], "rejected": [(-6.0, 3), (-3.0, 3)]}
    base = {"chosen": [(-3.0, 2), (-4.0, 4)], "rejected": [(-5.0, 3), (-5.0, 3)]}
    metrics = preference_metrics(cfg, tuned, base)
    # chosen rewards 0.5, 0.0; rejected -0.5, 1.0 -> margins 1.0, -1.0
    assert metrics["rewards/chosen"] == pytest.approx(0.25)
    assert metrics["rewards/rejected"] == pytest.approx(0.25)
    assert metrics["rewards/margins"] == pytest.approx(0.0)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    same = preference_metrics(cfg, base, base)
    assert same["rewards/margins"] == 0.0 and same["rewards/accuracies"] == 0.0


def test_simpo_rewards_use_mean_log_probs_without_reference():
    cfg = TrainConfig(stage="dpo", pref_loss="simpo", pref_beta=2.0)
    tuned = {"chosen": [(-2.0, 4)], "rejected": [(-3.0, 2)]}
    metrics = preference_metrics(cfg, tuned, None)
    assert metrics["rewards/chosen"] == pytest.approx(-1.0)
    assert metrics["rewards/rejected"] == pytest.approx(-3.0)
    assert metrics["rewards/accuracies"] == 1.0


@pytest.mark.parametrize("pref_loss", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_eval_rewards_equal_the_trainers_rewards(pref_loss):
    from tunepipe.evaluate.pref_metrics import MEAN_LOGPS, REFERENCE_FREE, pair_rewards
    from tunepipe.train.preference import losses as pref_losses

    assert pref_losses.USES_MEAN_LOGPS == MEAN_LOGPS
    cfg = TrainConfig(stage="dpo", pref_loss=pref_loss, pref_beta=0.3)
    tuned = {"chosen": [(-2.0, 4), (-1.0, 2)], "rejected": [(-6.0, 3), (-0.5, 1)]}
    base = {"chosen": [(-3.0, 4), (-1.5, 2)], "rejected": [(-5.0, 3), (-1.0, 1)]}
    chosen, rejected = pair_rewards(cfg, tuned, base)

    def logps(side, source):
        return torch.tensor([t / n if pref_loss in MEAN_LOGPS else t for t, n in source[side]], dtype=torch.float64)

    args = [logps("chosen", tuned), logps("rejected", tuned)]
    if pref_loss not in REFERENCE_FREE:
        args += [logps("chosen", base), logps("rejected", base)]
    loss = {"sigmoid": pref_losses.dpo_sigmoid_loss, "hinge": pref_losses.dpo_hinge_loss,
            "ipo": pref_losses.ipo_loss, "orpo": pref_losses.orpo_loss,
            "simpo": lambda pc, pr, beta: pref_losses.simpo_loss(pc, pr, beta, 0.5)}[pref_loss](*args, beta=0.3)
    assert chosen == pytest.approx(loss.chosen_rewards.tolist())
    assert rejected == pytest.approx(loss.rejected_rewards.tolist())


def test_kto_reward_margin_separates_desirable_from_undesirable():
    cfg = TrainConfig(stage="kto", pref_beta=1.0)
    tuned = {"rows": [(-1.0, 1), (-5.0, 1)], "tags": [True, False]}
    base = {"rows": [(-2.0, 1), (-4.0, 1)], "tags": [True, False]}
    metrics = preference_metrics(cfg, tuned, base)
    assert metrics["rewards/chosen"] == 1.0 and metrics["rewards/rejected"] == -1.0
    assert metrics["rewards/margins"] == 2.0


LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
               "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_turn_format_reproduces_the_chatml_template(tiny):
    _, tokenizer = tiny
    fmt = turn_format(tokenizer)
    assert fmt == TurnFormat(preamble="", system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
                             user_prefix="<|im_start|>user\n",
                             user_suffix="<|im_end|>\n<|im_start|>assistant\n",
                             assistant_suffix="<|im_end|>\n", default_system="You are a tiny test assistant.")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}]
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, *chat], tokenize=False,
                                             add_generation_prompt=True)
    assert fmt.render(chat, system="S") == expected
    assert end_of_turn_token(tokenizer) == "<|im_end|>"


def test_turn_format_keeps_a_one_off_bos_out_and_finds_the_end_of_turn_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>", "<|begin_of_text|>"]})
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = LLAMA3_LIKE
    fmt = turn_format(tokenizer)
    assert fmt.preamble == "<|begin_of_text|>"
    assert fmt.assistant_suffix == "<|eot_id|>" and fmt.default_system is None
    assert fmt.user_prefix == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in stop_token_ids(tokenizer)


def test_turn_format_gives_none_for_a_template_it_cannot_describe(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # numbers every turn: no fixed per-role wrapper exists
    tokenizer.chat_template = ("{% for m in messages %}[{{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    assert turn_format(tokenizer) is None


def test_pair_rows_follow_the_tokenized_contract(tiny):
    _, tokenizer = tiny
    row = pair_row(tokenizer, "Who are you?", "Tuney.", "A model.")
    assert row["chosen_input_ids"][: row["chosen_labels"].count(-100)] == \
        row["rejected_input_ids"][: row["rejected_labels"].count(-100)]
