"""Scoring one prediction: VQA answer normalisation and soft accuracy, POPE yes/no, option letters.

The normalisation follows the rules of the official VQA evaluation as LLaVA's TextVQA scorer
(``llava/eval/m4c_evaluator.py``, EvalAI's answer processor) applies them, in this order:

1. lower case; drop ``,`` and ``?``; split the possessive ``'s`` off its word (``"man's"`` -> ``"man 's"``);
   newlines and tabs become spaces;
2. punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``): removed when it touches a space
   somewhere in the answer, or when the answer has a comma between digits; otherwise it becomes a
   space; then a period not followed by a digit is removed (at most 32 of them, as the reference
   code's ``sub(..., re.UNICODE)`` passes 32 as the count);
3. words: number words ``none, zero .. ten`` become digits, the articles ``a an the`` are dropped,
   and apostrophe-less contractions are restored (``"dont"`` -> ``"don't"``).

The soft accuracy of a prediction against the 10 annotator answers is the mean, over the 10
leave-one-out subsets of 9 answers, of ``min(1, matches / 3)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the reference passes re.UNICODE (32) as sub()'s count


def _punctuation(text: str) -> str:
    strip_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if strip_all or (p + " " in text or " " + p in text) else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _words(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The VQA / TextVQA normal form of an answer (see the module docstring for the rules)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the leave-one-out subsets of ``answers`` of ``min(1, matches / 3)``.

    Both sides are normalised with :func:`normalize_answer`. With 10 annotator answers, a prediction
    given by 3 or more annotators scores 1, by 2 scores 0.6, by 1 scores 0.3.
    """
    if len(answers) < 2:
        raise ValueError(f"VQA soft accuracy needs the annotators' answers (10 in VQA/TextVQA), got {len(answers)}")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised ``answers`` (GQA-style accuracy)."""
    pred = normalize_answer(prediction)
    return any(normalize_answer(a) == pred for a in answers)


def pope_yes_no(prediction: str) -> str:
    """LLaVA's POPE reading of an answer: its first sentence says 'no' when it has the word No, no or not."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_ANSWER_IS = re.compile(r"The answer is ([A-D])")
_FOUR_OPTIONS = re.compile(r"A\. (.+?), B\. (.+?), C\. (.+?), D\. (.+)")


def parse_option_letter(prediction: str, question: str) -> str:
    """The FlexAttention release's MagnifierBench parser (``parse_pred_ans``): a letter A-D or ``"other"``.

    In order: "The answer is X"; the first of A, B, C, D (in that order) found in the prediction; an
    option text of the question's ``A. .., B. .., C. .., D. ..`` list found in the upper-cased
    prediction; the first of A-D found in the upper-cased prediction; else ``"other"``. The release
    passes the reformatted question (options on their own lines), where the option list pattern
    never matches; so do we (pass the prompt's question).
    """
    m = _ANSWER_IS.search(prediction)
    if m:
        return m.group(1)
    for letter in "ABCD":
        if letter in prediction:
            return letter
    m = _FOUR_OPTIONS.search(question)
    if m:
        for letter, option in zip("ABCD", m.groups(), strict=True):
            option = option.strip()
            if option.endswith((".", ",", "?")):
                option = option[:-1]
            if option.upper() in prediction.upper():
                return letter
    for letter in "ABCD":
        if letter in prediction.upper():
            return letter
    return "other"
