"""Routing with word evidence and a per-bank calibrated threshold, on the bundled base (issue 13)."""

from __future__ import annotations

import pytest
from adapterkit.testing import random_custom_diffusion, random_lora

from adapterkit.adapters.bank import AdapterBank
import torch

from adapterkit.adapters.routing import Router, content_words, read_background, split_compound, stem
from adapterkit.base import load_base
from adapterkit.demo import tasks

HELDOUT = ["derain", "cartoonize", "denoise", "lowlight"]


def probes():
    """bench/tiny_tasks.py's probe set (written before this router): never-stored phrasings of the bank's tasks,
    of the base's general edits (-> base), stored phrasings of general edits (-> base), unrelated text (-> base)."""
    out = [(p, t) for t in HELDOUT for p in tasks.TASKS[t].unseen_instructions]
    out += [(p, None) for t in tasks.GENERAL_TASKS for p in tasks.TASKS[t].unseen_instructions]
    out += [(tasks.TASKS[t].instructions[0], None) for t in tasks.GENERAL_TASKS[:8]]
    return out + [(p, None) for p in tasks.UNRELATED_INSTRUCTIONS]


@pytest.fixture(scope="module")
def bank():
    base = load_base("builtin:tiny")
    bank = AdapterBank(base)
    for i, task in enumerate(HELDOUT):
        make = random_custom_diffusion if i % 2 == 0 else random_lora
        bank.add(make(base, task, seed=i, instructions=list(tasks.TASKS[task].instructions)))
    return bank


def test_probe_accuracy_on_the_bundled_base(bank):
    rows = probes()
    assert len(rows) >= 40 and not {p for p, _ in rows} & {i for t in HELDOUT for i in tasks.TASKS[t].instructions}
    right = sum(bank.route(p)[0] == t for p, t in rows)
    # 46 of 48 (95.8%, issue 13's bar is 95%) since session 23 (a word the task word begins is another word: "lighten"
    # no longer half-matches lowlight's "light"); 45 with that half-match, 44 before compounds split
    assert right >= 46, right
    assert bank.route("invert the colors")[0] is None  # the demo's probe: a general edit, the base's own


def test_threshold_is_calibrated_per_bank_and_can_be_overridden(bank):
    details = bank.route_details("get rid of the rain")
    assert details["task"] == "derain" and details["score"] >= details["threshold"]
    calibration = details["calibration"]
    assert calibration["loo_positives"] == 20 and calibration["loo_negatives"] == 20
    assert 0 < bank.route_threshold < 1 and calibration["loo_balanced_accuracy"] >= 0.9
    assert bank.route("derain THE  image") == ("derain", 1.0)  # stored phrasing
    bank.route_threshold = 0.99
    assert bank.route("get rid of the rain")[0] is None
    bank.route_threshold = None  # back to the calibrated one
    assert bank.route("get rid of the rain")[0] == "derain"


def test_stemming_joins_word_forms():
    assert stem("noisy") == stem("noise") and stem("cartoonize") == stem("cartoon") and stem("rain") == "rain"


def test_function_words_carry_no_evidence():
    """A particle the background corpus rarely holds ("out": 2 of 684 prompts) weighed like a task's own word, and
    "zoom out a little" went to a desnow adapter storing "take out the snow" (bench/fresh_tasks.py)."""
    router = Router(lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1), read_background())
    router.set_tasks({"desnow": ["remove the snow", "desnow the image", "remove the falling snow",
                                 "clear the snowflakes from the photo", "take out the snow"],
                      "derain": list(tasks.TASKS["derain"].instructions)})
    assert content_words("take out the snow from it") == ["take", "snow"]
    for text in ("zoom out a little", "even out the surfaces", "make it out of focus"):
        assert router.parts(text)[0]["desnow"] == 0.0, text
    lex, _ = router.parts("take the snow out")
    assert lex["desnow"] > 0.5 and lex["derain"] == 0.0


def test_a_bank_of_one_task_storing_one_instruction_routes():
    """Leave-one-out has nothing to leave out here (an adapterkit edit --jobs run with one adapter hit an IndexError)."""
    base = load_base("builtin:tiny")
    bank = AdapterBank(base)
    bank.add(random_lora(base, "derain", rank=2, seed=1, instructions=["derain the image"]))
    assert bank.route("derain the image") == ("derain", 1.0)
    details = bank.route_details("remove the rain streaks")
    assert details["threshold"] == 0.5 and details["task"] in ("derain", None)
    bank.close()


def test_a_merged_adapter_holding_its_sources_phrasings_does_not_lower_the_threshold():
    """The demo's bank: derain, cartoonize and their merge, which stores both tasks' phrasings. Counting the merge's
    exact matches as confusions pushed the calibrated threshold to 0.09 and sent "make it brighter" (a general edit,
    the base's own) to cartoonize."""
    base = load_base("builtin:tiny")
    bank = AdapterBank(base)
    derain, cartoonize = (list(tasks.TASKS[t].instructions) for t in ("derain", "cartoonize"))
    bank.add(random_lora(base, "derain", rank=2, seed=1, instructions=derain))
    bank.add(random_custom_diffusion(base, "cartoonize", seed=2, instructions=cartoonize))
    bank.add(random_custom_diffusion(base, "merged", seed=3, instructions=derain + cartoonize))
    assert bank.route("make it brighter")[0] is None and bank.route("invert the colors")[0] is None
    assert bank.route("please remove the rain")[0] in ("derain", "merged")
    assert bank.route_threshold > 0.15, bank.route_details("make it brighter")
    bank.close()


def test_an_instruction_the_base_records_as_its_own_goes_to_the_base():
    """bench/fresh_tasks.py's bank sent "invert the colors" (one of builtin:tiny's general edits) to its colour-cast
    adapter: the words "the colors" outweigh nothing else. The base records the phrasings it was trained on
    (adapterkit_base.json "instructions"); an adapter that stores one of them still gets it."""
    import dataclasses

    base = load_base("builtin:tiny")
    assert "invert the colors" in base.info["instructions"]
    decast = ["remove the color cast", "fix the white balance", "correct the color tint", "neutralize the colors",
              "fix the tinted photo"]
    unaware = AdapterBank(dataclasses.replace(base, info={}))  # a base that records no instructions
    unaware.add(random_lora(base, "decast", rank=2, seed=1, instructions=decast))
    assert unaware.route("invert the colors")[0] == "decast"  # what happened before
    unaware.close()
    bank = AdapterBank(base)
    bank.add(random_lora(base, "decast", rank=2, seed=1, instructions=decast))
    details = bank.route_details("Invert  the colors")
    assert (details["task"], details["score"], details["base_instruction"]) == (None, 1.0, True)
    assert bank.route("remove the color cast") == ("decast", 1.0)
    bank.add(random_custom_diffusion(base, "negative", seed=2, instructions=["invert the colors"]))
    assert bank.route("invert the colors") == ("negative", 1.0)  # an adapter trained on it wins
    bank.close()


def test_compounds_split_and_one_spare_letter_is_another_word():
    """Session 22: "take away the raindrops" matched derain's "rain" only half (0.206 < threshold 0.216) and "take
    the grain out" matched it half through "g+rain". A compound of two known words now splits ("raindrops" -> rain,
    drops: a full match); a word that holds a task word with one letter to spare ("grain") matches nothing, while
    an affix ("derain", "denoise") still counts half."""
    vocabulary = {"rain", "drop", "snow", "fall", "nois"}
    assert split_compound("raindrops", vocabulary) == ["rain", "drops"] and split_compound("snowfall", vocabulary) == ["snow", "fall"]
    assert split_compound("derain", vocabulary) == ["derain"] and split_compound("grain", vocabulary) == ["grain"]
    router = Router(lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1), read_background())
    router.set_tasks({"derain": list(tasks.TASKS["derain"].instructions), "denoise": list(tasks.TASKS["denoise"].instructions)})
    assert router.parts("take the grain out")[0]["derain"] == 0.0
    assert router.parts("take away the raindrops")[0]["derain"] == pytest.approx(router.parts("take away the rain drops")[0]["derain"])
    assert router.parts("take away the raindrops")[0]["derain"] > router.parts("take away the fooraining")[0]["derain"] > 0


def test_a_word_the_task_word_begins_is_another_word_and_meaning_endings_are_stemmed():
    """Session 23: "rainbow", "snowman", "lightning" and "lighten" half-matched derain, desnow and lowlight through
    the task word they begin with ("add a rainbow in the sky" went to derain, score 0.22 over a threshold of 0.22;
    "lighten the picture", the base's brighter edit, to lowlight). A prefix before the task word still counts half
    ("derain", "lowlight"), and the endings that keep the meaning are stemmed: "cartoonish", "cartoonist"."""
    router = Router(lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1), read_background())
    router.set_tasks({t: list(tasks.TASKS[t].instructions) for t in ("derain", "lowlight", "cartoonize")}
                     | {"desnow": ["remove the snow", "take out the snow"]})
    for text, task in (("add a rainbow in the sky", "derain"), ("build a snowman", "desnow"),
                       ("add lightning to the sky", "lowlight"), ("lighten it", "lowlight")):
        assert router.parts(text)[0][task] == 0.0, text
    assert router.parts("derain")[0]["derain"] > 0 and router.parts("fix the light")[0]["lowlight"] > 0
    assert stem("cartoonish") == stem("cartoonist") == stem("cartoon")
    assert max(router.parts("make it cartoonish")[0], key=router.parts("make it cartoonish")[0].get) == "cartoonize"
