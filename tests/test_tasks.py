"""Built-in instruction tasks, their verifiers, splits and preference data; the user JSONL readers."""

from __future__ import annotations

import json

import pytest

from glassmind.common import GlassmindError
from glassmind.data import tasks as T


def test_every_task_has_prompts_and_a_working_verifier():
    for task in T.TASKS:
        pool = T.pool(task)
        assert len(pool) > 20, task
        assert len({e.key for e in pool}) == len(pool), f"{task}: keys must be unique"
        for e in pool[:50]:
            assert T.verify(e, e.answer)
            assert T.verify(e, f"  {e.answer}\n")          # surrounding whitespace is ignored
            assert not T.verify(e, f"The answer is {e.answer}.")
            assert not T.verify(e, e.answer + "0")


def test_answers_are_right():
    by_key = {e.key: e for task in T.TASKS for e in T.pool(task)}
    assert by_key["add:3+4"].answer == "7" and by_key["add:3+4"].prompt == "What is 3 + 4?"
    assert by_key["compare:12:7"].answer == "12"
    assert by_key["reverse:apple"].answer == "e l p p a"
    assert by_key["reverse:apple"].prompt == "Reverse the letters a p p l e."
    assert by_key["sort:tiger"].answer == "e g i r t"
    assert by_key["count:a:banana"].answer == "3"
    assert by_key["count:a:banana"].prompt == "How many times does the letter a appear in b a n a n a?"
    assert by_key["count:e:banana"].answer == "0"
    ent = T.world(0)[0]
    assert by_key[f"world0:{ent.name}:color"].answer == ent.color
    assert by_key[f"world0:{ent.name}:town"].prompt == f"Where does {ent.name} live?"


def test_deterministic_by_seed():
    assert T.train_examples(50, seed=3) == T.train_examples(50, seed=3)
    assert T.train_examples(50, seed=3) != T.train_examples(50, seed=4)
    assert T.world(1) == T.world(1) and T.world(1) != T.world(0)
    assert T.heldout_examples(5) == T.heldout_examples(5)
    a = T.builtin_preferences("train", 10, seed=1)
    b = T.builtin_preferences("train", 10, seed=1)
    assert [(p.responses, p.ranks) for p in a] == [(p.responses, p.ranks) for p in b]


def test_tasks_are_balanced_and_selectable():
    ex = T.train_examples(60, seed=0)
    assert {t: sum(e.task == t for e in ex) for t in T.TASKS} == {t: 10 for t in T.TASKS}
    assert {e.task for e in T.train_examples(10, 0, tasks=["add"])} == {"add"}
    with pytest.raises(GlassmindError, match="unknown task"):
        T.train_examples(3, 0, tasks=["algebra"])


def test_letter_words_are_fixed_and_many():
    """reverse/sort/count use WORDS plus made-up words, the same list everywhere, too many to memorise."""
    words = T.letter_words()
    assert len(words) == len(set(words)) > 14_000
    assert words[:len(T.WORDS)] == T.WORDS
    assert all(w.isalpha() and w.islower() for w in words)
    assert T.spell("tiger") == "t i g e r"


def test_sft_rl_and_heldout_splits_are_disjoint_and_cover_the_pool():
    """Each prompt is in exactly one of sft / rl / heldout, by a hash of its key; 'train' is sft + rl."""
    for task in T.TASKS:
        parts = {name: {e.key for e in T.split_pool(task, name)} for name in ("sft", "rl", "heldout", "train")}
        assert parts["sft"] and parts["rl"] and parts["heldout"]
        assert not parts["sft"] & parts["rl"] and not parts["sft"] & parts["heldout"]
        assert not parts["rl"] & parts["heldout"]
        assert parts["sft"] | parts["rl"] == parts["train"]
        assert parts["train"] | parts["heldout"] == {e.key for e in T.pool(task)}
        if len(T.pool(task)) > 1000:
            assert 0.45 < len(parts["sft"]) / len(T.pool(task)) < 0.55, task
            assert 0.25 < len(parts["rl"]) / len(T.pool(task)) < 0.35, task
    assert all(T.split_of(e.key) == "rl" for e in T.train_examples(60, 1, split="rl"))
    assert all(T.split_of(e.key) == "sft" for e in T.train_examples(60, 1))  # SFT's is the default
    assert all(T.split_of(p.example.key) == "rl" for p in T.builtin_preferences("rl", 30, seed=0))
    with pytest.raises(GlassmindError, match="split must be one of"):
        T.split_pool("add", "test")
    with pytest.raises(GlassmindError, match="never come from the held-out split"):
        T.train_examples(3, 0, split="heldout")


def test_heldout_prompts_never_appear_in_training():
    """The split is a hash of the prompt's key, independent of the seed: no seed draws a held-out prompt."""
    for task in T.TASKS:
        train = {e.key for e in T.split_pool(task, "train")}
        held = {e.key for e in T.split_pool(task, "heldout")}
        assert held and train and not (train & held)
        assert {e.prompt for e in T.split_pool(task, "train")}.isdisjoint(
            {e.prompt for e in T.split_pool(task, "heldout")})
        fraction = len(held) / (len(held) + len(train))
        assert 0.1 < fraction < 0.3, (task, fraction)
    heldout_prompts = {e.prompt for e in T.heldout_examples(1000)}
    for seed in range(20):
        assert not heldout_prompts & {e.prompt for e in T.train_examples(300, seed)}
        assert not heldout_prompts & {p.prompt[0]["content"] for p in T.builtin_preferences("train", 60, seed)}
    assert all(T.is_heldout(e.key) for e in T.heldout_examples(30))


def test_world_sentences_state_every_fact():
    text = T.world_text(0, repeats=1)
    for e in T.world(0):
        for value in (e.kind, e.color, e.town, e.food):
            assert f"{value}" in text
        assert f"{e.name} lives in {e.town}." in text
        assert f"{e.name} eats {e.food}." in text
    assert "a orange" not in text and "a owl" not in text
    assert len(T.world_text(0, repeats=3).splitlines()) == 3 * len(T.world_sentences(0))


def test_builtin_preferences_follow_the_rule():
    """K = 5: correct (rank 0) > two near misses (rank 1, tied) > wrong format (2) > rambling (3)."""
    prefs = T.builtin_preferences("train", 120, seed=0)
    positions_of_best = set()
    for p in prefs:
        e = p.example
        assert sorted(p.ranks) == [0, 1, 1, 2, 3]
        best = p.responses[p.ranks.index(0)]
        positions_of_best.add(p.ranks.index(0))
        assert best == e.answer and T.verify(e, best)
        for reply, rank in zip(p.responses, p.ranks):
            if rank > 0:
                assert not T.verify(e, reply), (e, reply)
            if rank == 1:  # same format: a number for numbers, spelled letters for reverse and sort, a word
                assert T.well_formed(e, reply), (e, reply)
            if rank == 2:
                assert reply == f"The answer is {e.answer}."
            if rank == 3:
                assert len(reply) > 40
        near = [r for r, k in zip(p.responses, p.ranks) if k == 1]
        assert len(set(near)) == 2
        assert len(p.pairs()) == 9  # 10 pairs, one of them a tie
    assert positions_of_best == set(range(5))  # the best reply's position tells nothing
    held = T.builtin_preferences("heldout", 30, seed=0)
    assert len(held) == 30 and all(T.is_heldout(p.example.key) for p in held)


def test_dev_split_is_heldout_and_disjoint_from_the_report():
    """Tuning prompts: held out from training, and never among the first `skip` per task that a report uses."""
    report = {e.key for e in T.heldout_examples(T.REPORT_PER_TASK)}
    dev = T.dev_examples(100)
    assert dev and all(T.is_heldout(e.key) for e in dev)
    assert not report & {e.key for e in dev}
    assert {e.task for e in dev} == {"compare", "reverse", "sort", "count"}  # add 77 and world 24 held out
    assert {e.task for e in T.dev_examples(100, skip=50)} == {"add", "compare", "reverse", "sort", "count"}
    assert {e.key for e in T.dev_examples(5, skip=0)} <= {e.key for e in T.heldout_examples(5)}
    assert T.dev_examples(100) == dev


def test_sampled_replies_ranked_by_the_rule():
    """correct (0) > ended and well formed (1) > truncated or another form (2); duplicates merge; all-tied
    samples give no ranking."""
    add = next(e for e in T.pool("add") if e.key == "add:3+4")
    rev = next(e for e in T.pool("reverse") if e.key == "reverse:apple")
    assert T.rank_samples(add, ["7", "8", "8", "seven", " 7 ", "12"], [True, True, False, True, True, True]) == \
        [0, 1, 2, 2, 0, 1]
    assert T.rank_samples(rev, ["e l p p a", "e l p a", "elppa", "e l p p 4", "e  l"], [True] * 5) == \
        [0, 1, 2, 2, 2]
    assert T.rank_samples(add, ["7"], [False]) == [0]  # the verifier decides correctness, cut or not
    p = T.sampled_preference(add, ["8", "7", "8", "x", "7"], [True] * 5)
    assert p.responses == ["8", "7", "x"] and p.ranks == [1, 0, 2] and p.example is add
    assert p.pairs() == [(0, 2), (1, 0), (1, 2)]
    assert T.sampled_preference(add, ["8", "9", "9"], [True] * 3) is None
    assert T.sampled_preference(add, ["7", "7"], [True, True]) is None


# ------------------------------------------------------------------------------------------ user data


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_read_sft_jsonl(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    path = write(tmp_path, "sft.jsonl", [{"messages": conv}, "", {"messages": conv[1:]}])
    assert T.read_sft_jsonl(path) == [conv, conv[1:]]
    for bad, match in (({"messages": []}, "non-empty"), ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
                       ({"messages": [{"role": "user", "content": "x"}]}, "no assistant"), ("{oops", "not valid JSON")):
        with pytest.raises(GlassmindError, match=match):
            T.read_sft_jsonl(write(tmp_path, "bad.jsonl", [bad]))
    with pytest.raises(GlassmindError, match="not found"):
        T.read_sft_jsonl(tmp_path / "missing.jsonl")


def test_read_preferences_pairs_and_rankings(tmp_path):
    path = write(tmp_path, "prefs.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Name a color."}], "responses": ["red", "blue", "car"],
         "ranking": [1, 1, 2]},
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go away"},
    ])
    a, b, c = T.read_preferences_jsonl(path)
    assert a.prompt == [{"role": "user", "content": "What is 2 + 2?"}]
    assert a.responses == ["4", "5"] and a.ranks == [0, 1] and a.pairs() == [(0, 1)]
    assert b.ranks == [1, 1, 2] and sorted(b.pairs()) == [(0, 2), (1, 2)]  # the tie gives no strict pair
    assert c.responses == ["Hello", "Go away"]
    for bad, match in (({"prompt": "x", "responses": ["a"], "ranking": [1]}, "at least 2"),
                       ({"prompt": "x", "responses": ["a", "b"], "ranking": [1]}, "same length"),
                       ({"prompt": "x", "responses": ["a", "b"], "ranking": ["1", "2"]}, "integer"),
                       ({"prompt": "x", "chosen": "a"}, "chosen"), ({"chosen": "a", "rejected": "b"}, "prompt"),
                       ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
                        "end with the user")):
        with pytest.raises(GlassmindError, match=match):
            T.read_preferences_jsonl(write(tmp_path, "bad.jsonl", [bad]))


def test_preferences_round_trip(tmp_path):
    prefs = T.builtin_preferences("train", 5, seed=2)
    path = T.write_preferences_jsonl(tmp_path / "p.jsonl", prefs)
    back = T.read_preferences_jsonl(path)
    assert [(p.prompt, p.responses, p.pairs()) for p in back] == [(p.prompt, p.responses, p.pairs()) for p in prefs]
    assert all(min(json.loads(line)["ranking"]) == 1 for line in path.read_text().splitlines())
