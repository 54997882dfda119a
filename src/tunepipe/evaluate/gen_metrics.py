"""Generation metrics: ROUGE-1/2/L and BLEU-4 between generated answers and references.

The scoring itself is the ecosystem's: Google's `rouge-score` (F-measure) and NLTK's
`sentence_bleu` with Chen & Cherry smoothing method 3 (the NIST geometric smoothing
LLaMA-Factory also uses). What is ours is the tokenization fed to both: rouge-score's
default tokenizer keeps only `[a-z0-9]` and so silently scores Chinese, Japanese or
Korean text as empty. Here every CJK character is one token (the usual convention for
scoring CJK without a word segmenter), any other run of word characters is one
lower-cased token, and punctuation is dropped. Scores are averaged over samples and
reported on LLaMA-Factory's 0-100 scale.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

GEN_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

# CJK Unified Ideographs (+ extension A and compatibility ideographs), Hiragana,
# Katakana, Hangul syllables and jamo: scripts written without spaces between words.
_CJK = (r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
        r"\u1100-\u11ff\u3130-\u318f\uac00-\ud7af")
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")


def score_tokens(text: str) -> list[str]:
    """Tokens used for ROUGE and BLEU: one per CJK character, one per other word."""
    return _TOKEN.findall(text.lower())


class _ScoreTokenizer:
    """The object rouge-score calls `.tokenize(text)` on."""

    def tokenize(self, text: str) -> list[str]:
        return score_tokens(text)


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_ScoreTokenizer())


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 in [0, 1], smoothed so a missing 4-gram does not zero the score."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hypothesis, ref = score_tokens(prediction), score_tokens(reference)
    if not hypothesis or not ref:
        return 0.0
    return float(sentence_bleu([ref], hypothesis, smoothing_function=SmoothingFunction().method3))


def sample_scores(prediction: str, reference: str, scorer=None) -> dict[str, float]:
    """ROUGE F-measures and BLEU-4 of one prediction, each in [0, 1]."""
    scorer = scorer or _rouge_scorer()
    if not score_tokens(prediction) or not score_tokens(reference):
        return dict.fromkeys(GEN_METRICS, 0.0)
    rouge = scorer.score(reference, prediction)
    return {"rouge-1": rouge["rouge1"].fmeasure, "rouge-2": rouge["rouge2"].fmeasure,
            "rouge-l": rouge["rougeL"].fmeasure, "bleu-4": bleu4(prediction, reference)}


def corpus_scores(predictions: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """Mean of each per-sample score, x100 (LLaMA-Factory's `predict_rouge-1` etc.)."""
    scorer = _rouge_scorer()
    totals = dict.fromkeys(GEN_METRICS, 0.0)
    count = 0
    for prediction, reference in zip(predictions, references, strict=True):
        for key, value in sample_scores(prediction, reference, scorer).items():
            totals[key] += value
        count += 1
    if count == 0:
        return {}
    return {key: round(100.0 * total / count, 4) for key, total in totals.items()}


def identity_accuracy(predictions: Iterable[str], keywords: list[str]) -> float:
    """Fraction of answers containing any keyword, case-insensitively (e.g. the new name)."""
    lowered = [keyword.lower() for keyword in keywords if keyword]
    answers = list(predictions)
    if not answers or not lowered:
        return 0.0
    hits = sum(any(keyword in answer.lower() for keyword in lowered) for answer in answers)
    return hits / len(answers)
