"""The word lists of the word-order rules (``stages.common.wordorder``):
small closed classes of English (determiners, prepositions, auxiliaries,
pronouns), attribute kinds, relations, and the nouns that look like verbs.
Lower case; multi-word relations are matched longest first."""

from __future__ import annotations

DETERMINERS = frozenset(
    "a an the some this these those my your his her its our their one two three four five six seven eight nine "
    "ten eleven twelve many several few each every another no both lots".split()
)
#: attribute kinds: an attribute swap trades two values of one kind
ATTRIBUTES = {
    "colour": "red orange yellow green blue purple violet pink brown black white grey gray golden silver beige "
    "ginger teal turquoise maroon",
    "size": "big small large little tiny huge tall short long giant",
    "age": "old new young",
    "state": "empty full open closed wet dry hot cold clean dirty broken",
    "material": "wooden metal metallic plastic leather ceramic woollen woolen",
    "pattern": "striped spotted checkered plaid dotted floral",
    "mood": "happy sad angry",
}
ATTRIBUTE_KIND = {w: kind for kind, words in ATTRIBUTES.items() for w in words.split()}
#: asymmetric relations (longest match first); a swap around them changes who is where
RELATIONS = tuple(
    sorted(
        (
            "on top of|in front of|to the left of|to the right of|on the left of|on the right of|left of|right of|"
            "inside of|out of|on|in|inside|under|underneath|beneath|below|above|over|behind|into|onto|atop|within|"
            "outside|riding|holding|chasing|carrying|pushing|pulling|feeding|eating|watching|biting|following|"
            "leading|wearing|covering|hitting|kicking|throwing|catching|petting|walking|lifting|dragging|licking|"
            "drinking|looking at"
        ).split("|"),
        key=lambda r: -len(r.split()),
    )
)
#: symmetric relations: swapping the phrases around them says the same thing
SYMMETRIC = ("next to", "close to", "across from", "together with", "beside", "near", "alongside", "with", "and",
             "by", "among", "between", "facing", "opposite", "nearby")  # fmt: skip
PREPOSITIONS = frozenset(
    "of at for from to about as like during without against toward towards across around along past per via off "
    "up down out away before after since until than through upon beyond".split()
)
CONJUNCTIONS = frozenset("and or but nor so yet then while because if whereas".split())
WH = frozenset("that which who whom whose what where when how why".split())
AUXILIARIES = frozenset("is are was were be been being am has have had can could will would may might must shall "
                        "should do does did not isn't aren't".split())  # fmt: skip
PRONOUNS = frozenset(
    "it they he she we you i me him them us itself themselves himself herself there here someone something "
    "everything nothing anyone everyone".split()
)
#: nouns that frame the picture: "a photo of X" is about X, not about a photo
FRAMING = frozenset(
    "photo photograph picture image drawing painting illustration view shot closeup close-up portrait render "
    "rendering sketch snapshot selfie scan print poster cartoon clipart vector stock icon side top front back "
    "close up".split()
)
#: words ending in -ing / -ed that are nouns, not verbs
ING_NOUNS = frozenset(
    "building ceiling painting clothing drawing ring king wedding pudding string thing something nothing everything "
    "anything wing spring swing sling evening morning sibling duckling railing awning icing frosting topping "
    "stuffing bedding lighting parking crossing landing opening earring offspring dumpling lightning gathering "
    "meeting ping bling viking sterling herring sing".split()
)
#: common verbs that end in neither (present and past tense)
VERBS = frozenset(
    "sits stands lies runs jumps walks flies hangs sleeps rests waits looks plays swims rides holds eats drinks "
    "carries leans hides grows floats sat stood lay ran jumped walked flew hung slept rested waited looked played "
    "swam rode held ate drank leaned hid grew floated perched parked".split()
)
ED_NOUNS = frozenset("bed shed sled seed weed reed steed feed breed speed tweed hundred sacred bread".split())
BOUNDARY = (
    PREPOSITIONS
    | CONJUNCTIONS
    | WH
    | AUXILIARIES
    | PRONOUNS
    | frozenset(w for r in SYMMETRIC for w in r.split() if len(r.split()) == 1)
)
#: every word the rules know: a caption with too few of them is not English
KNOWN = (
    DETERMINERS | frozenset(ATTRIBUTE_KIND) | frozenset(w for r in RELATIONS for w in r.split()) | BOUNDARY | FRAMING
    | frozenset(w for r in SYMMETRIC for w in r.split())
)  # fmt: skip
