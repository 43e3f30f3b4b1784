"""metadata_match: a hand-checked table of captions x entries (overlaps,
case, punctuation, multi-word entries, non-ASCII), matched by pyahocorasick
and by the naive loop over every entry, in both modes; entries files in both
formats; the checks before Ray; the automaton built once per process."""

import json

import numpy as np
import pytest

from pairforge.pipeline.checks import check_job
from pairforge.pipeline.config import ConfigError, load_job
from pairforge.stages.base import fresh_rows, object_array, run_stage_batch
from pairforge.stages.common import metadata as md
from pairforge.stages.metadata_match import Config, MetadataMatchStage

ENTRIES = [
    "new york",  # 0
    "york",  # 1: inside 0
    "new york city",  # 2: around 0
    "Dog",  # 3: case
    "hot dog",  # 4: multi-word
    "café",  # 5
    "straße",  # 6: casefolds to "strasse"
    "東京",  # 7: a script without spaces
    "naïve",  # 8
    "cat",  # 9
    "c++",  # 10: ends in punctuation
    "e-mail",  # 11
    "NEW YORK",  # 12: the same as 0 once casefolded: skipped
    "",  # 13: blank: skipped
    "art",  # 14
]

#: caption -> (substring matches, word-boundary matches), checked by hand
TABLE = {
    "A hot-dog stand in New York City!": ([0, 1, 2, 3], [0, 1, 2, 3]),
    "HOTDOG, Concatenated CATS and a Cat.": ([3, 9], [9]),  # the bounded "cat" is the last one
    "Café crème at the Strasse — naive art": ([5, 6, 14], [5, 6, 14]),
    "東京タワーの夜景": ([7], [7]),
    "I ♥ C++ and e-mail; start over": ([10, 11, 14], [10, 11]),
    "NAÏVE ＮＥＷ ＹＯＲＫ": ([0, 1, 8], [0, 1, 8]),  # full-width letters: NFKC
    "yorkshire terrier": ([1], []),
    "Dog dog DOG": ([3], [3]),
    "newyork": ([1], []),
    "cafe\u0301 au lait": ([5], [5]),  # a decomposed é: NFKC composes it
    "Berliner Straße": ([6], [6]),
    "nothing here": ([], []),
    "": ([], []),
    "🐶 dog 🐱cat, zoo\x00dog": ([3, 9], [3, 9]),  # beyond the BMP (one code point each); a NUL in a caption
}


@pytest.fixture()
def entries_file(tmp_path):
    p = tmp_path / "entries.txt"
    p.write_text("\n".join(ENTRIES) + "\n", encoding="utf-8")
    return p


@pytest.mark.parametrize("bounds", [False, True])
def test_automaton_and_naive_loop_match_the_hand_checked_table(entries_file, bounds):
    entries, _ = md.read_entries(entries_file)
    assert entries.skipped == 2 and len(entries) == 13 and entries.size == len(ENTRIES)  # "NEW YORK" and ""
    m = md.Matcher(entries, word_boundaries=bounds)
    for caption, want in TABLE.items():
        expected = want[1] if bounds else want[0]
        assert m.match(caption) == expected, (caption, bounds)
        assert md.match_naive(entries, caption, bounds) == expected, (caption, bounds)
    assert m.match(None) == [] and md.match_naive(entries, None) == []
    many = m.match_many(list(TABLE) + [None, 3.5])  # one pass over a batch: the same as one by one
    assert [x.tolist() for x in many] == [m.match(c) for c in TABLE] + [[], []]


def test_metaclip_json_list_gives_the_same_ids(tmp_path, entries_file):
    j = tmp_path / "metadata.json"
    j.write_text(json.dumps(ENTRIES, ensure_ascii=False), encoding="utf-8")
    a, _ = md.read_entries(entries_file)
    b, _ = md.read_entries(j)
    assert (a.ids, a.words) == (b.ids, b.words)
    (tmp_path / "bad.json").write_text('["dog", 3]')
    with pytest.raises(ValueError, match="item 1 is 3, not a string"):
        md.read_entries(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"dog": 1}')
    with pytest.raises(ValueError, match="expected a JSON list of strings"):
        md.read_entries(tmp_path / "obj.json")


def test_stage_writes_ids_and_counts_and_drops_unmatched_rows(entries_file):
    caps = list(TABLE) + [None]
    rows = fresh_rows([f"00000{i:04d}" for i in range(len(caps))], caption=object_array(caps))
    out = run_stage_batch(MetadataMatchStage(Config(entries=str(entries_file))), rows)
    for i, cap in enumerate(caps):
        want = TABLE.get(cap, ([], []))[0]
        assert out["metadata_entries"][i].tolist() == want and out["metadata_entries"][i].dtype == np.int32
        assert out["num_metadata_entries"][i] == len(want)
        assert out["reason"][i] == ("" if want else "no_metadata_match")
    detail = json.loads(out["detail"][len(caps) - 1])
    assert detail == {"entries": len(ENTRIES), "word_boundaries": False}
    kept = run_stage_batch(MetadataMatchStage(Config(entries=str(entries_file), drop_unmatched=False)), rows)
    assert (kept["status"] == "ok").all() and kept["num_metadata_entries"][-1] == 0


def test_automaton_is_built_once_per_process_and_checks_the_file(entries_file):
    md._MATCHERS.clear()
    a, b = (MetadataMatchStage(Config(entries=str(entries_file))) for _ in range(2))
    a.setup()
    b.setup()
    assert a._matcher is b._matcher and len(md._MATCHERS) == 1
    import pickle

    shipped = pickle.loads(pickle.dumps(a))  # what a worker gets: the path and digest, no automaton
    assert shipped._matcher is None and shipped.sha256 == a.sha256
    entries_file.write_text("other\n")  # another file at that path on a worker's node
    md._MATCHERS.clear()
    with pytest.raises(RuntimeError, match="different file"):
        shipped.setup()


def test_wordnet_default_is_installed_and_matches():
    path = md.wordnet_path()
    assert path.is_file(), f"{path} missing: make setup builds it (scripts/build_wordnet_entries.py)"
    st = MetadataMatchStage(Config(word_boundaries=True))
    entries, _ = md.read_entries(path)
    assert len(entries) > 100_000  # WordNet 3.0: ~137k lemmas of up to two words
    words = dict(zip(entries.ids, entries.words))
    rows = fresh_rows(["000000000"], caption=object_array(["A golden retriever eats ice cream in New York"]))
    got = {words[i] for i in run_stage_batch(st, rows)["metadata_entries"][0]}
    assert {"golden retriever", "ice cream", "new york", "york", "cream", "eat"} - got == {"eat"}  # "eats": no boundary


def _job(tmp_path, **stage):
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a dog\n")
    return load_job(
        {
            "input": {"paths": ["urls.csv"]},
            "output": {"dir": str(tmp_path / "out")},
            "stages": [{"name": "metadata_match", **stage}, {"name": "balance"}, "shard"],
        },
        base_dir=tmp_path,
    )


def test_entries_problems_are_one_line_naming_the_key_before_ray(tmp_path):
    for entries, words in (
        (str(tmp_path / "nope.txt"), "no file"),
        ("s3://bucket/entries.txt", "not read yet"),
    ):
        with pytest.raises(ConfigError) as e:
            check_job(_job(tmp_path, entries=entries))
        msg = str(e.value)
        assert msg.count("\n") == 0 and msg.startswith("stages[0](metadata_match).entries: ") and words in msg, msg
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"^stages\[0\]\(metadata_match\)\.entries: .* holds no entry$"):
        check_job(_job(tmp_path, entries=str(tmp_path / "empty.txt")))


def test_balance_without_metadata_match_is_refused_naming_the_column(tmp_path):
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a dog\n")
    job = load_job(
        {"input": {"paths": ["urls.csv"]}, "output": {"dir": str(tmp_path / "out")}, "stages": ["balance", "shard"]},
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="reads column 'metadata_entries'.*add a 'metadata_match' stage"):
        check_job(job)
