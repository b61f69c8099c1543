"""`hfp_needle`: a needle in a haystack scored by log-likelihood, so that small models give a signal.

A sentence "The special magic word is <word>." is hidden at a given depth of RULER's essay haystack (the data
`hf-patch prepare-tasks --only ruler` unpacks), filled to a target context length in tokens; the question at the
end asks for the word, and the model scores `NUM_CHOICES` candidate words as continuations (multiple choice,
chance 1 / NUM_CHOICES). Every candidate is one token of the run's tokenizer and none occurs elsewhere in the
document (filler or prompt), so lm-eval scores all of a document's choices from one forward pass of its context
(requests that share a context and have one-token continuations share it), and only the needle can single the
right one out.

Metadata (`--metadata` / the task manager's, as for lm-eval's RULER): `max_seq_lengths` (default [4096]),
`needle_depths` (fractions of the filler before the needle; default `DEPTHS`, cycled over the documents),
`needle_samples` (documents per length, default 100), and the tokenizer (`tokenizer`, else `pretrained`, else
`model`). Documents are deterministic given those: each has a seed of its own (length, index).
"""
from __future__ import annotations

import bisect
import itertools
import random
import re
from typing import Any

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NUM_CHOICES = 10
SAMPLES = 100
NEEDLE = "The special magic word is {value}."
PROMPT = ("A special magic word is hidden within the following text. Make sure to memorize it. I will quiz you about "
          "the word afterwards.\n{context}\nWhat is the special magic word mentioned in the provided text? The "
          "special magic word mentioned in the provided text is")
_SENTENCE_END = (".", "?", "!", '."', ".'", ".)")


def single_token_words(tokenizer, words: list[str]) -> list[str]:
    """The lower-case alphabetic `words` (4+ letters) that `tokenizer` encodes, after a space, as one token."""
    ok = sorted({w for w in words if w.isalpha() and w.islower() and len(w) >= 4})
    ids = tokenizer([" " + w for w in ok], add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(ok, ids) if len(i) == 1]


def needle_prompt(filler: list[str], n: int, depth: float, value: str) -> str:
    """The prompt with the first `n` filler words and the needle at the first sentence start at or after
    `depth` of them (at the end if none)."""
    pos = round(depth * n)
    while 0 < pos < n and not filler[pos - 1].endswith(_SENTENCE_END):
        pos += 1
    context = " ".join([*filler[:pos], NEEDLE.format(value=value), *filler[pos:n]])
    return PROMPT.format(context=context)


def fit_words(tokenizer, filler: list[str], depth: float, value: str, max_length: int) -> tuple[str, int]:
    """(prompt, its token count) with about the most filler words such that the prompt plus the answer token fits
    in `max_length` tokens: the count is estimated from the filler's own token offsets, then lowered until the
    whole prompt, tokenized, fits."""
    def tokens(n: int) -> int:
        return len(tokenizer(needle_prompt(filler, n, depth, value), add_special_tokens=False)["input_ids"])

    room = max_length - 1 - tokens(0)
    if room < 0:
        raise ValueError(f"hfp_needle: max_seq_length {max_length} leaves no room for the prompt ({tokens(0)} tokens)")
    ends = [end for _, end in tokenizer(" ".join(filler), add_special_tokens=False,
                                        return_offsets_mapping=True)["offset_mapping"]]
    word_ends = list(itertools.accumulate(len(w) + 1 for w in filler))  # one past each word's end
    n = bisect.bisect_right([bisect.bisect_left(ends, e - 1) + 1 for e in word_ends], room)
    while n > 0 and (excess := tokens(n) + 1 - max_length) > 0:
        n -= excess
    n = max(n, 0)
    return needle_prompt(filler, n, depth, value), tokens(n)


def needle_docs(tokenizer, haystack: str, candidates: list[str], max_length: int, samples: int = SAMPLES,
                depths: tuple[float, ...] | list[float] = DEPTHS) -> list[dict[str, Any]]:
    """`samples` documents {"input", "choices", "gold", "depth", "max_length", "length"} at `max_length` tokens;
    document i hides its word at depths[i % len(depths)], in filler that starts at a random word of `haystack`."""
    words = re.sub(r"\s+", " ", haystack).strip().split(" ")
    template = set(re.findall(r"[a-z]+", (PROMPT + NEEDLE).lower()))
    docs = []
    for i in range(samples):
        rng = random.Random(f"hfp_needle:{max_length}:{i}")
        start = rng.randrange(len(words))
        filler = (words[start:] + words[:start])[:max_length]
        seen = template | {re.sub(r"[^a-z]", "", w.lower()) for w in filler}
        pool = [w for w in candidates if w not in seen]
        if len(pool) < NUM_CHOICES:
            raise ValueError(f"hfp_needle: only {len(pool)} one-token candidate words left for document {i}; the "
                             f"tokenizer needs at least {NUM_CHOICES} single-token nouns absent from the filler")
        choices = rng.sample(pool, NUM_CHOICES)
        gold = rng.randrange(NUM_CHOICES)
        depth = float(depths[i % len(depths)])
        prompt, length = fit_words(tokenizer, filler, depth, choices[gold], max_length)
        docs.append({"input": prompt, "choices": choices, "gold": gold, "depth": depth, "max_length": max_length,
                     "length": length + 1})
    return docs


def load(**kwargs: Any) -> dict[str, Any]:
    """{"test": Dataset} of the needle documents at each of `max_seq_lengths` (lm-eval's `custom_dataset`)."""
    import datasets
    import wonderwords
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name

    from hf_patch.eval.tasks.ruler import essays_text, local_tokenizer

    tokenizer = get_tokenizer(resolve_tokenizer_name(local_tokenizer(kwargs)))
    nouns = wonderwords.RandomWord()._categories["nouns"]  # the word list lm-eval's RULER draws its keys from
    candidates = single_token_words(tokenizer, nouns)
    haystack = essays_text()
    docs = [doc for length in kwargs.get("max_seq_lengths", DEFAULT_SEQ_LENGTHS)
            for doc in needle_docs(tokenizer, haystack, candidates, int(length),
                                   int(kwargs.get("needle_samples", SAMPLES)), kwargs.get("needle_depths", DEPTHS))]
    return {"test": datasets.Dataset.from_list(docs)}
