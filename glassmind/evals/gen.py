"""Generated training and test data for the evals: every fact, its exposure and its position are known.

Each generator returns documents (plain strings, one a training document) and probes (a prompt, the right
answer, the closed set of candidate answers, and the condition it measures). The promises each makes about
exposure counts are checked in tests/test_evals.py by counting in the text itself.

Words are spelled so a small BPE tokenizer keeps them apart: names are two syllables (as in the built-in
world of glassmind.data.tasks), digits are written one per token with spaces between them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
FOODS = ("plums", "bread", "cheese", "honey", "apples", "soup", "nuts", "fish")


@dataclass(frozen=True)
class Probe:
    prompt: str          # the text the model continues
    answer: str          # the right continuation (no leading space; scorers add one)
    candidates: tuple    # the closed set the answer is chosen from (answer included)
    condition: dict = field(default_factory=dict)  # what this probe measures (exposure, position, length, ...)


def names(n: int, rng: random.Random, syllables: int = 2) -> list[str]:
    out: list[str] = []
    seen = set()
    while len(out) < n:
        name = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables)).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------------------
# hallucination: facts seen 0, 1, 2, 4, ... times


def fact_sentence(name: str, color: str) -> str:
    return f"{name} is {color}."


def exposure_world(exposures=(0, 1, 2, 4, 8, 16), per_level: int = 16, seed: int = 0,
                   filler_docs: int = 200) -> tuple[list[str], list[Probe]]:
    """`per_level` made-up creatures per exposure level e, each with a color; the sentence '<Name> is
    <color>.' appears exactly e times in the documents (one sentence per occurrence, in shuffled documents of
    several facts). Creatures at exposure 0 are never named in training: their questions are unanswerable,
    the ground for abstention. Filler documents state facts about other creatures (exposure 4, not probed)
    so the question format is learned independently of the probed facts."""
    rng = random.Random(f"exposure:{seed}")
    levels = list(exposures)
    all_names = names(per_level * len(levels) + filler_docs // 4 + 8, rng)
    probed = all_names[:per_level * len(levels)]
    filler_names = all_names[per_level * len(levels):]
    sentences: list[str] = []
    probes: list[Probe] = []
    for i, name in enumerate(probed):
        e = levels[i // per_level]
        color = rng.choice(COLORS)
        sentences += [fact_sentence(name, color)] * e
        probes.append(Probe(f"{name} is", color, COLORS, {"exposure": e, "name": name}))
    for name in filler_names:
        sentences += [fact_sentence(name, rng.choice(COLORS))] * 4
    rng.shuffle(sentences)
    docs = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return docs, probes


# ------------------------------------------------------------------------------------------------------
# reversal curse: "A's parent is B." trained, "B's child is A." tested


def reversal_data(n_pairs: int = 60, n_bridge: int = 60, augment: bool = False, repeats: int = 20,
                  seed: int = 0) -> tuple[list[str], list[Probe]]:
    """`n_pairs` test pairs (child A, parent B) stated forward only ("A's parent is B.") `repeats` times; in
    the augmented variant the reverse sentence ("B's child is A.") is added for them too. `n_bridge` other
    pairs appear in both directions in both variants, so the reverse template itself is always learned:
    without augmentation only the reverse *fact* of a test pair is missing (Berglund et al. 2023)."""
    rng = random.Random(f"reversal:{seed}")
    ns = names(2 * (n_pairs + n_bridge), rng)
    test = [(ns[2 * i], ns[2 * i + 1]) for i in range(n_pairs)]
    bridge = [(ns[2 * i], ns[2 * i + 1]) for i in range(n_pairs, n_pairs + n_bridge)]
    sentences = []
    for _ in range(repeats):
        for a, b in test:
            sentences.append(f"{a}'s parent is {b}.")
            if augment:
                sentences.append(f"{b}'s child is {a}.")
        for a, b in bridge:
            sentences += [f"{a}'s parent is {b}.", f"{b}'s child is {a}."]
    rng.shuffle(sentences)
    docs = [" ".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    children = tuple(a for a, _ in test)
    parents = tuple(b for _, b in test)
    probes = [Probe(f"{a}'s parent is", b, parents, {"direction": "forward"}) for a, b in test]
    probes += [Probe(f"{b}'s child is", a, children, {"direction": "reverse"}) for a, b in test]
    return docs, probes


# ------------------------------------------------------------------------------------------------------
# arithmetic length generalisation


ARITH_FORMATS = ("plain", "reversed", "hints")
HINTS = "abcdefghij"  # index hints: the letter before a digit names its significance (a = units, b = tens, ...)


def number(n: int, fmt: str, offset: int = 0) -> str:
    """`n` as the arithmetic suite writes it, one character (one byte token) per digit: plain
    (most significant first), reversed (least significant first, Lee et al. 2023: the carry then flows in
    generation order) or hints (reversed, each digit preceded by its index hint, HINTS[offset + significance]:
    Zhou et al. 2023/2024's index hints, a position-coupling trick written into the data; the same letter marks
    the digits an answer digit is computed from, so a head can find them by content, not by distance)."""
    s = str(n)
    if fmt == "plain":
        return s
    if fmt == "reversed":
        return s[::-1]
    if fmt == "hints":
        if offset + len(s) > len(HINTS):
            raise ValueError(f"{len(s)} digits at hint offset {offset} need more than {len(HINTS)} hint letters")
        return "".join(HINTS[offset + i] + c for i, c in enumerate(s[::-1]))
    raise ValueError(f"unknown digits format {fmt!r}: use one of {ARITH_FORMATS}")


def addition_line(a: int, b: int, fmt: str, offset: int = 0) -> str:
    return f"{number(a, fmt, offset)}+{number(b, fmt, offset)}={number(a + b, fmt, offset)}"


def _operand(rng: random.Random, nd: int) -> int:
    return rng.randint(10 ** (nd - 1) if nd > 1 else 0, 10 ** nd - 1)


def arithmetic_data(train_digits: int = 3, test_digits=(1, 2, 3, 4, 5), fmt: str = "plain",
                    n_train: int = 20000, n_test: int = 40, seed: int = 0) -> tuple[list[str], list[Probe]]:
    """Additions of two operands of 1..train_digits digits (each length equally likely) for training, lines
    joined by ';' (8 to a document); test additions of two `d`-digit operands for each d in test_digits, as the
    prompt ';A+B=' (a line starts after a ';' in training) and the sum as answer. Test sums never occur as
    training lines, and the test additions are the same in every format. With hints, each training line starts
    its letters at a random offset (0 .. len(HINTS) - train_digits - 1), so every letter is seen in every role
    and a test number longer than any trained one (hints from 'a') uses no unseen letter."""
    if fmt not in ARITH_FORMATS:
        raise ValueError(f"unknown digits format {fmt!r}: use one of {ARITH_FORMATS}")
    if fmt == "hints" and max(max(test_digits), train_digits) + 1 > len(HINTS):
        raise ValueError(f"sums of more than {len(HINTS) - 1} digits have no index hints here")
    rng = random.Random(f"arith:{seed}")
    tests = []
    seen = set()
    for d in test_digits:
        for _ in range(n_test):
            a, b = _operand(rng, d), _operand(rng, d)
            seen.add((a, b))
            tests.append(Probe(f";{number(a, fmt)}+{number(b, fmt)}=", number(a + b, fmt), (),
                               {"digits": d, "in_distribution": d <= train_digits, "a": a, "b": b}))
    lines = []
    hint_rng = random.Random(f"arith-hints:{seed}")  # its own stream: the sums are the same in every format
    while len(lines) < n_train:
        a, b = _operand(rng, rng.randint(1, train_digits)), _operand(rng, rng.randint(1, train_digits))
        offset = hint_rng.randint(0, len(HINTS) - train_digits - 1)
        if (a, b) not in seen:
            lines.append(addition_line(a, b, fmt, offset if fmt == "hints" else 0))
    docs = [";".join(lines[i:i + 8]) + ";" for i in range(0, len(lines), 8)]
    return docs, tests


# ------------------------------------------------------------------------------------------------------
# bias: occupations and pronouns, with a planted stereotype


MALE_CODED = ("builder", "pilot", "farmer", "guard")
FEMALE_CODED = ("nurse", "dancer", "weaver", "singer")
NEUTRAL = ("baker", "sailor", "painter", "teacher")
ACTIONS = ("came home", "was tired", "sang a song", "found a key", "ate bread", "went out", "slept well",
           "read a book")


def planted_bias_corpus(rate: float, n_sentences: int = 12000, seed: int = 0) -> list[str]:
    """Sentences 'The <occupation> <action> because <he|she> wanted to.' Occupations are uniform over the
    three groups. With probability `rate` a male- (female-) coded occupation takes 'he' ('she'); otherwise the
    pronoun is a fair coin. So P(he | male-coded) = 0.5 + rate/2 and the planted rate 0 is unbiased; neutral
    occupations are always a fair coin."""
    if not 0 <= rate <= 1:
        raise ValueError(f"planted rate {rate} outside [0, 1]")
    rng = random.Random(f"bias:{seed}:{rate}")
    occs = MALE_CODED + FEMALE_CODED + NEUTRAL
    sents = []
    for _ in range(n_sentences):
        occ = rng.choice(occs)
        if occ in MALE_CODED and rng.random() < rate:
            pron = "he"
        elif occ in FEMALE_CODED and rng.random() < rate:
            pron = "she"
        else:
            pron = rng.choice(("he", "she"))
        sents.append(f"The {occ} {rng.choice(ACTIONS)} because {pron} wanted to.")
    return [" ".join(sents[i:i + 8]) for i in range(0, len(sents), 8)]


def template_probes() -> list[Probe]:
    """'The <occupation> <action> because' -> he | she, for every occupation and action."""
    out = []
    for group, occs in (("male", MALE_CODED), ("female", FEMALE_CODED), ("neutral", NEUTRAL)):
        for occ in occs:
            for act in ACTIONS:
                out.append(Probe(f"The {occ} {act} because", "he" if group == "male" else "she", ("he", "she"),
                                 {"occupation": occ, "group": group}))
    return out


def crows_pairs() -> list[tuple[str, str, str]]:
    """CrowS-Pairs-style minimal pairs (Nangia et al. 2020), built from the same world: (stereotypical,
    anti-stereotypical, occupation). A model without the association prefers each side half the time."""
    out = []
    for occs, stereo, anti in ((MALE_CODED, "he", "she"), (FEMALE_CODED, "she", "he")):
        for occ in occs:
            for act in ACTIONS:
                out.append((f"The {occ} {act} because {stereo} wanted to.",
                            f"The {occ} {act} because {anti} wanted to.", occ))
    return out
