"""The word-order rules the confounders stage writes its ``word_order``
rows with (``stages.common.wordorder``): a hand-checked table of caption
styles, each caption's confounder or the reason it is skipped, so that a
change to the rules shows as a changed line; every rewrite keeps the
caption's words and changes their order; and the trainer's generated scene
pairs are among the rewrites. The stage itself: tests/stages/test_confounders.py."""

from collections import Counter

import pytest

from pairforge.stages.common import wordorder as wo

# ------------------------------------------------------------ the rules

#: caption -> its word-order confounder, or ``skip:<reason>``; every output was read and judged sensible
CAPTIONS = [
    # attribute swaps (COCO-like, short, numbers, title case, alt text)
    ("a mug in some grass", "some grass in a mug"),
    ("A red cup on a blue table.", "A blue cup on a red table."),
    ("an orange cup on a red table", "a red cup on an orange table"),
    ("an old man with a young woman", "a young man with an old woman"),
    ("A kitchen with white cabinets and a black stove.", "A kitchen with black cabinets and a white stove."),
    ("A black cat and a white dog.", "A white cat and a black dog."),
    ("a small dog chasing a big cat in the yard", "a big dog chasing a small cat in the yard"),
    ("an empty glass next to a full bottle", "a full glass next to an empty bottle"),
    ("2 red apples and 3 green pears", "2 green apples and 3 red pears"),
    ("Red Cup On Blue Table", "Blue Cup On Red Table"),
    ("there is a red circle left of a blue square", "there is a blue circle left of a red square"),
    ("green triangle above purple circle", "purple triangle above green circle"),
    ("Stock Photo - red cup on blue table 1920x1080 jpg", "Stock Photo - blue cup on red table 1920x1080 jpg"),
    (
        "A young boy in a red shirt is holding a small yellow ball while standing on the grass near a fence in the "
        "backyard of a house on a sunny day with his family watching from the porch behind him.",
        "A young boy in a yellow shirt is holding a small red ball while standing on the grass near a fence in the "
        "backyard of a house on a sunny day with his family watching from the porch behind him.",
    ),
    # phrase swaps around relations, prepositions and verbs
    ("a man riding a horse on a beach", "a horse riding a man on a beach"),
    ("A man riding a wave on top of a surfboard.", "A wave riding a man on top of a surfboard."),
    ("A cat sitting on top of a wooden bench.", "A wooden bench sitting on top of a cat."),
    ("A person holding an umbrella in the rain.", "An umbrella holding a person in the rain."),
    ("A woman eating a sandwich at a table.", "A sandwich eating a woman at a table."),
    ("A child is standing on a skateboard.", "A skateboard is standing on a child."),
    ("a truck carrying a boat", "a boat carrying a truck"),
    ("a horse pulling a cart on a dirt road", "a cart pulling a horse on a dirt road"),
    ("a girl looking at a boy", "a boy looking at a girl"),
    ("an elephant behind a tree", "a tree behind an elephant"),
    ('"A tree in front of a house"', '"A house in front of a tree"'),
    ("A bird above a tree.", "A tree above a bird."),
    ("A dog under a car!", "A car under a dog!"),
    ("Flowers in a vase on a window sill.", "A vase in flowers on a window sill."),
    ("a cup of coffee on a saucer with a spoon", "a saucer on a cup of coffee with a spoon"),
    ("a dog's bowl on the floor", "the floor on a dog's bowl"),
    ("a t-shirt on a hanger", "a hanger on a t-shirt"),
    ("The quick brown fox jumps over the lazy dog", "The lazy dog jumps over the quick brown fox"),
    ("The painted chair behind a table covered in dust.", "A table behind the painted chair covered in dust."),
    ("a rocket on the launch pad before take off", "the launch pad on a rocket before take off"),
    ("product photo of a coat on a plain background", "product photo of a plain background on a coat"),
    ("Photo: a bird on a wire", "Photo: a wire on a bird"),
    ("A close up of a sandwich on a plate", "A close up of a plate on a sandwich"),
    ("3 cats on 2 beds", "2 beds on 3 cats"),
    ("a café on a street", "a street on a café"),
    # rightly skipped
    ("a red and blue cup on a table", "skip:no_noun_phrase"),  # one cup with two colours
    ("a big dog and a little dog", "skip:symmetric_relation"),  # the same thing said again
    ("A dog next to a cat", "skip:symmetric_relation"),
    ("A plate of food with broccoli and rice.", "skip:symmetric_relation"),
    ("a cup on a cup", "skip:identical_phrases"),
    ("a cat on it", "skip:pronoun"),
    ("a photo of a coat", "skip:no_relation"),
    ("close up of green grass", "skip:no_relation"),
    ("a ginger tabby cat looking to the side", "skip:no_relation"),
    ("A bicycle leaning against a wall.", "skip:no_relation"),
    ("old coins laid out in rows on a dark table", "skip:no_noun_phrase"),  # "rows" is the object of "in"
    ("black and white photo of a man with a camera on a tripod", "skip:no_noun_phrase"),
    ("cute puppy 🐶 in a basket", "skip:no_noun_phrase"),
    ("Is this a cat on a mat?", "skip:no_noun_phrase"),
    ("IMG_2034.JPG", "skip:no_relation"),
    ("red cup", "skip:no_relation"),
    ("", "skip:empty"),
    ("Vintage Leather Bag | Handmade | Free Shipping", "skip:not_english"),
    ("ein Hund in einem Park", "skip:not_english"),
    ("un chat noir sur une table rouge", "skip:not_english"),
    ("一只猫坐在桌子上", "skip:not_english"),
    ("Кошка на столе", "skip:not_english"),
    (
        "A man with a very long beard and a tall hat who is standing proudly beside his old and rusty red car on a "
        "long and dusty road through the desert at sunset while a group of curious children watch from behind a "
        "low stone wall and a dog sleeps in the shade of a tree nearby",
        "skip:too_long",
    ),
]


@pytest.mark.parametrize("caption,want", CAPTIONS, ids=[c[:40] or "empty" for c, _ in CAPTIONS])
def test_caption_table(caption, want):
    got, why = wo.rewrite(caption)
    assert (got.caption if got else f"skip:{why}") == want


def test_every_rewrite_keeps_the_words_and_changes_their_order():
    assert len(CAPTIONS) >= 40
    made = 0
    for caption, _ in CAPTIONS:
        for r in wo.rewrites(caption)[0]:
            made += 1
            assert Counter(wo.words(r.caption)) == Counter(wo.words(caption))
            assert wo.normalize(r.caption) != wo.normalize(caption)
            assert wo.bag(r.caption) == wo.bag(caption) and r.rule in ("attribute", "phrase")
    assert made > 40


def test_a_generated_scene_pair_is_among_the_rewrites_of_its_first_caption():
    import random

    from pairforge.trainer import scenes

    rng = random.Random(0)
    for _ in range(100):
        a, b = scenes.confounder_pair(rng)
        assert b.caption in [r.caption for r in wo.rewrites(a.caption)[0]], (a.caption, b.caption)
