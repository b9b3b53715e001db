"""MQAR (multi-query associative recall, as in Zoology): key-value pairs, a gap, then queries of keys.

Text form (for real tokenizers), one example::

    Each word is paired with a number. Remember the pairs.
    Pairs: tiger=42 apple=17 river=88 stone=31
    Notes: just over about still ...            (``gap`` filler words; the line is absent when gap=0)
    Recall: river=88 apple=17 tiger=

The first ``num_queries - 1`` queries are shown answered (the teacher-forced queries of MQAR); the
last is open and its value is the exact answer. Keys are common nouns (one BPE token each with their
leading space), values are numbers of ``value_digits`` digits; both are sampled without replacement.

Token form (for training from scratch or probes): ``mqar_token_sequences`` gives Zoology's layout
``k1 v1 ... kP vP <gap> q1 a1 ... qQ aQ`` as ids with labels on the answers only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from graftlm.eval.tasks import Example, Task, register_task

KEY_WORDS = (
    "apple", "river", "stone", "tiger", "cloud", "table", "horse", "bread", "chair", "ocean", "glass", "plant",
    "train", "house", "music", "paper", "night", "money", "water", "light", "field", "green", "heart", "smile",
    "watch", "dream", "bird", "fish", "door", "book", "tree", "star", "moon", "ship", "rock", "lake", "road",
    "king", "ring", "bell", "lamp", "coat", "shoe", "milk", "rice", "salt", "gold", "iron", "wood", "wind",
    "rain", "snow", "fire", "sand", "hill", "farm", "city", "town", "bank", "shop", "park", "game", "song",
    "film", "card", "wall", "roof", "desk", "bike", "boat", "cake", "tea", "egg", "dog", "cat", "cow", "pig",
    "bee", "fox", "owl", "bus", "car", "pen", "cup", "hat", "bag", "box", "key", "map", "sun", "sky", "sea",
    "ice", "oil", "gas", "leaf", "seed", "root", "rose", "lion", "wolf", "bear", "duck", "frog", "goat",
    "queen", "doctor", "farmer", "window", "garden", "bridge", "castle", "forest", "island", "planet",
    "rocket", "silver", "winter", "summer", "spring", "butter", "pepper", "orange", "banana", "carrot",
    "guitar", "piano", "camera", "pencil", "bottle", "basket", "candle", "mirror", "pillow", "blanket",
)
FILLER_WORDS = (
    "the", "and", "then", "just", "over", "about", "still", "very", "some", "many", "more", "most", "other",
    "such", "only", "also", "again", "often", "here", "there", "when", "where", "while", "after", "before",
    "under", "between", "through", "during", "without", "always", "never", "maybe", "quite",
    "rather", "almost", "enough", "soon", "later", "early", "today", "together", "however", "perhaps",
    "indeed", "already", "around", "across", "along", "behind", "beyond", "within", "toward", "upon",
)

INSTRUCTION = "Each word is paired with a number. Remember the pairs."


@dataclass(frozen=True)
class MQARSample:
    """One MQAR instance: the pairs in order, the queried keys in order, and the filler words of the gap."""

    pairs: tuple[tuple[str, str], ...]
    queries: tuple[str, ...]
    filler: tuple[str, ...]

    def value_of(self, key: str) -> str:
        """Returns the value paired with ``key``."""
        return dict(self.pairs)[key]

    @property
    def answers(self) -> tuple[str, ...]:
        """Returns the values of the queried keys, in query order."""
        return tuple(self.value_of(key) for key in self.queries)


def sample_mqar(rng: random.Random, num_pairs: int, num_queries: int, gap: int, value_digits: int = 2) -> MQARSample:
    """Returns a random ``MQARSample`` drawn with ``rng`` (distinct keys, distinct values)."""
    low, high = 10 ** (value_digits - 1), 10**value_digits - 1
    if value_digits == 1:
        low = 0
    if not 1 <= num_pairs <= min(len(KEY_WORDS), high - low + 1):
        raise ValueError(f"num_pairs must be in 1..{min(len(KEY_WORDS), high - low + 1)} for value_digits={value_digits}")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries must be in 1..num_pairs ({num_pairs}), got {num_queries}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    keys = rng.sample(KEY_WORDS, num_pairs)
    values = [str(v) for v in rng.sample(range(low, high + 1), num_pairs)]
    queries = rng.sample(keys, num_queries)
    filler = tuple(rng.choice(FILLER_WORDS) for _ in range(gap))
    return MQARSample(tuple(zip(keys, values)), tuple(queries), filler)


def render_prompt(sample: MQARSample) -> str:
    """Returns the text prompt of ``sample``: all queries but the last answered, the last left open."""
    lines = [INSTRUCTION, "Pairs: " + " ".join(f"{k}={v}" for k, v in sample.pairs)]
    if sample.filler:
        lines.append("Notes: " + " ".join(sample.filler))
    answered = [f"{k}={sample.value_of(k)}" for k in sample.queries[:-1]]
    lines.append("Recall: " + " ".join(answered + [f"{sample.queries[-1]}="]))
    return "\n".join(lines)


class MQARTask(Task):
    """Multi-query associative recall rendered as text; the answer is the last query's value."""

    name = "mqar"
    max_new_tokens = 5
    answer_prefix = ""  # "tiger=42", as the answered queries of the prompt are written

    def __init__(self, num_pairs: int = 4, num_queries: int = 2, gap: int = 0, value_digits: int = 2):
        self.num_pairs, self.num_queries, self.gap, self.value_digits = num_pairs, num_queries, gap, value_digits
        self.max_new_tokens = value_digits + 3
        sample_mqar(random.Random(0), num_pairs, num_queries, gap, value_digits)  # validates the parameters

    def params(self) -> dict:
        """Returns the task's parameters."""
        return {"num_pairs": self.num_pairs, "num_queries": self.num_queries, "gap": self.gap,
                "value_digits": self.value_digits}

    def examples(self, n: int, seed: int) -> list[Example]:
        """Returns ``n`` MQAR examples, identical for the same ``seed``."""
        rng = random.Random(f"mqar-{seed}")
        out = []
        for _ in range(n):
            sample = sample_mqar(rng, self.num_pairs, self.num_queries, self.gap, self.value_digits)
            key = sample.queries[-1]
            position = [k for k, _ in sample.pairs].index(key)
            out.append(Example(render_prompt(sample), sample.value_of(key),
                               {"key": key, "pair_index": position, "pairs": [list(p) for p in sample.pairs]}))
        return out


register_task("mqar")(MQARTask)


def mqar_token_sequences(n: int, num_pairs: int, num_queries: int, gap: int = 0, key_vocab: int = 64,
                         value_vocab: int = 64, seed: int = 0, filler_id: int = 0):
    """Returns ``(input_ids, labels)``, two LongTensors of shape ``[n, 2*num_pairs + gap + 2*num_queries]``.

    Layout per row: ``k1 v1 ... kP vP``, ``gap`` copies of ``filler_id``, then ``q1 a1 ... qQ aQ``. Keys
    are ids ``1..key_vocab``, values ``key_vocab+1..key_vocab+value_vocab`` (so the model's vocabulary
    must be larger than ``key_vocab + value_vocab``). ``labels`` follow the Hugging Face convention
    (aligned with ``input_ids``; the model shifts them): the answer ids at answer positions, -100 elsewhere.
    """
    import torch

    if num_pairs > min(key_vocab, value_vocab) or not 1 <= num_queries <= num_pairs:
        raise ValueError("need num_pairs <= min(key_vocab, value_vocab) and 1 <= num_queries <= num_pairs")
    generator = torch.Generator().manual_seed(seed)
    length = 2 * num_pairs + gap + 2 * num_queries
    input_ids = torch.full((n, length), filler_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for row in range(n):
        keys = torch.randperm(key_vocab, generator=generator)[:num_pairs] + 1
        values = torch.randperm(value_vocab, generator=generator)[:num_pairs] + 1 + key_vocab
        input_ids[row, 0 : 2 * num_pairs : 2] = keys
        input_ids[row, 1 : 2 * num_pairs : 2] = values
        chosen = torch.randperm(num_pairs, generator=generator)[:num_queries]
        start = 2 * num_pairs + gap
        input_ids[row, start::2] = keys[chosen]
        input_ids[row, start + 1 :: 2] = values[chosen]
        labels[row, start + 1 :: 2] = values[chosen]
    return input_ids, labels
