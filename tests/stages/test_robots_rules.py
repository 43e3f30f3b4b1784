"""What a robots.txt says (RFC 9309; stages/common/robots.py, robots_text.py):
the group and the rule that rule a URL, where protego alone departs from the
RFC, the rule a rejection names, a file cut at the cap, AI crawlers' groups
as opt-outs, the bounded crawl-delay, origins and the stored file's checks.
The files come from a loopback host where a test reads one as the crawler
does; how a fetch turns into a file, and the cache, are in
test_robots_fetch.py."""

from __future__ import annotations

import functools
import json
import random
import time

import pytest
from protego import Protego

from pairforge.pipeline.httpserver import LocalHTTPServer
from pairforge.stages.common.fetch import Fetched
from pairforge.stages.common.robots import AI_TOKENS, RobotsFile, RobotsPolicy, classify, fetch_robots, origin_of
from pairforge.stages.common.robots_cache import RobotsCache
from tests import robotskit
from tests.robotskit import RULES, SafeGet, fetched, next_address, origin, text

site, get = robotskit.site, robotskit.get


@pytest.fixture(scope="module")
def rules_site():
    """One host serving RULES, its robots.txt fetched once for the module."""
    get = SafeGet()
    with LocalHTTPServer({"/robots.txt": text(RULES)}, host=next_address()) as server:
        yield fetch_robots(get, origin(server)), server
    get.close()


# ------------------------------------------------------------ matching rules


@pytest.mark.parametrize(
    "path, allowed, rule",
    [
        ("/", True, ""),  # our group, chosen over "*" (which disallows all)
        ("/private/x", False, "Disallow: /private/"),
        ("/private/public/x", True, ""),  # the longest match wins
        ("/img/a.gif", False, "Disallow: /*.gif$"),
        ("/img/a.gif?size=2", True, ""),  # "$" ends the URL; a query follows
        ("/img/a.GIF", True, ""),  # paths match case-sensitively
        ("/tmp42/cache/x", False, "Disallow: /tmp*/cache"),
        ("/tmp42/nocache", True, ""),
        ("/tie", True, ""),  # Allow and Disallow of one length: Allow wins
        ("/fish", False, "Disallow: /fish$"),
        ("/fish.html", True, ""),
        ("/~joe/index.html", False, "Disallow: /%7Ejoe/"),  # %7E is "~", unreserved: decoded
        ("/caf%C3%A9/menu", False, "Disallow: /caf\u00e9/"),  # non-ASCII is percent-encoded before comparing
        ("/caf\u00e9/menu", False, "Disallow: /caf\u00e9/"),
        ("/pair-only/x", True, ""),  # "User-agent: pair" is not our product token
    ],
)
def test_rules_of_our_group(rules_site, path, allowed, rule):
    file, server = rules_site
    assert file.outcome == "rules" and file.status == 200
    verdict = RobotsPolicy(file).check(server.url(path))
    assert verdict.allowed is allowed, verdict
    if not allowed:
        assert verdict.reason == "robots_disallowed"
        assert verdict.detail["robots_rule"] == rule
        assert verdict.detail["robots_group"] == "pairforge"
        assert verdict.detail["robots_url"] == server.url("/robots.txt")
        assert RULES.splitlines()[verdict.detail["robots_line"] - 1] == rule


def test_other_crawlers_get_the_star_group(rules_site):
    file, server = rules_site
    verdict = RobotsPolicy(file, token="otherbot").check(server.url("/anything"))
    assert not verdict.allowed
    assert verdict.detail["robots_group"] == "*" and verdict.detail["robots_rule"] == "Disallow: /"
    assert RobotsPolicy(file, token="otherbot").check(server.url("/robots.txt")).allowed


def test_percent_encoded_slash_is_not_a_slash():
    """RFC 9309 2.2.2 keeps reserved characters encoded, and a server reads
    ``/a%2Fb`` as one path segment: ``Disallow: /a%2Fb`` does not rule
    ``/a/b`` (protego's reading, kept; the RFC's table has an example that
    decodes ``%2F`` in a query, which its own text does not ask for)."""
    policy = RobotsPolicy(RobotsFile("http://h:80", "rules", 200, RULES))
    assert policy.check("http://h/a/b").allowed
    assert not policy.check("http://h/a%2Fb").allowed
    assert not policy.check("http://h/a%2fb").allowed  # the hex digits' case does not matter


def test_group_is_the_exact_product_token():
    """Where protego alone departs from RFC 9309 2.2.1, covered by
    robots_text: protego would let ``User-agent: pair`` rule ``pairforge``
    (it finds the value inside the name), would not match
    ``User-agent: PairForge/2.1`` (the product token is ``PairForge``), and
    would lose a first line after a byte order mark."""

    def allowed(body: str, path: str = "/x", token: str = "pairforge") -> bool:
        return RobotsPolicy(RobotsFile("http://h:80", "rules", 200, body), token=token).check("http://h" + path).allowed

    assert allowed("User-agent: pair\nDisallow: /\n")
    assert allowed("User-agent: pairforge-images\nDisallow: /\n")
    assert not allowed("User-agent: PAIRFORGE/2.1 (+https://example.org)\nDisallow: /\n")
    assert not allowed("\ufeffUser-agent: *\nDisallow: /\n")
    assert not allowed("User agent: pairforge\nDisallow: /\n")  # protego's tolerated spellings still work
    # groups for one token are merged (2.2.1), wherever they are
    merged = (
        "User-agent: pairforge\nDisallow: /a\n\nUser-agent: other\nDisallow: /\n\nUser-agent: PairForge\nDisallow: /b\n"
    )
    assert not allowed(merged, "/a") and not allowed(merged, "/b") and allowed(merged, "/c")
    # a user-agent line after a rule starts a new group, blank line or not
    assert allowed("User-agent: other\nDisallow: /\nUser-agent: pairforge\nDisallow: /z\n", "/x")
    # a longer token is not ruled by a group for a shorter one, either way round
    assert allowed("User-agent: gptbot\nDisallow: /\n", token="gptbot-images")


def test_the_rule_named_is_the_one_protego_matched():
    """The detail's rule is found by our own matcher (protego does not say
    which rule matched); over random files of wildcards, anchors, percent
    escapes and non-ASCII, every rejected URL names a rule, and that rule
    on its own disallows the URL in protego's reading."""
    rng = random.Random(7)
    alphabet = [
        "a",
        "b",
        "/",
        "%61",
        "%2F",
        "%2f",
        "\u00e9",
        "%C3%A9",
        "~",
        "%7E",
        "=",
        "%3D",
        ":",
        "?",
        "x.gif",
        "%25",
    ]
    pattern_extra = ["*", "$"]

    def path(extra=()):
        return "/" + "".join(rng.choice(alphabet + list(extra)) for _ in range(rng.randint(0, 6)))

    rejected = 0
    for _ in range(150):
        rules = [("Disallow" if rng.random() < 0.7 else "Allow", path(pattern_extra)) for _ in range(rng.randint(1, 8))]
        policy = RobotsPolicy(
            RobotsFile("http://h:80", "rules", 200, "User-agent: *\n" + "".join(f"{k}: {v}\n" for k, v in rules))
        )
        for _ in range(20):
            url = "http://h" + path()
            verdict = policy.check(url)
            if verdict.allowed:
                continue
            rejected += 1
            rule = verdict.detail["robots_rule"]
            assert rule.startswith("Disallow: "), (rules, url)
            assert not Protego.parse(f"User-agent: *\n{rule}\n").can_fetch(url, "x"), (rules, url, rule)
    assert rejected > 500


def test_a_large_group_names_its_rule_quickly():
    """25,000 rules in one group: naming the rule of a rejection costs a
    few lookups, not a pass over every rule."""
    body = "User-agent: *\n" + "".join(f"Disallow: /p{i}/\n" for i in range(25_000))
    policy = RobotsPolicy(RobotsFile("http://h:80", "rules", 200, body))
    urls = [f"http://h/p{i}/z.jpg" for i in range(0, 25_000, 125)]
    policy.check(urls[0])
    started = time.perf_counter()
    details = [policy._why(url, "*") for url in urls]
    took = time.perf_counter() - started
    assert [d["robots_rule"] for d in details] == [f"Disallow: /p{i}/" for i in range(0, 25_000, 125)]
    assert took < 0.5, f"{took:.2f}s for {len(urls)} rule look-ups"


def test_a_truncating_fetcher_is_read_as_cut():
    """A fetcher that cuts the body at the cap (what fetch_robots asks of
    ``get``) returns exactly ``max_bytes``: parsed up to the last whole line."""
    body = b"User-agent: *\nDisallow: /a/\nDisallow: /b-cut-short"
    file = classify("http://h:80", Fetched(url="http://h/robots.txt", body=body, http_status=200), max_bytes=len(body))
    assert file.outcome == "rules" and file.truncated and file.body == "User-agent: *\nDisallow: /a/\n"
    whole = classify(
        "http://h:80", Fetched(url="http://h/robots.txt", body=body, http_status=200), max_bytes=len(body) + 1
    )
    assert not whole.truncated and whole.body.endswith("/b-cut-short")


# ------------------------------------------------------------ AI crawlers, crawl-delay


AI_OPT_OUT = "User-agent: *\nAllow: /\n\nUser-agent: CCBot\nUser-agent: GPTBot\nDisallow: /photos/\n"


def test_ai_token_disallow_is_an_opt_out(site, get):
    file, server = fetched(site, get, {"/robots.txt": text(AI_OPT_OUT)})
    url = server.url("/photos/cat.jpg")
    assert RobotsPolicy(file).check(url).allowed  # the list off: GPTBot's rules are not ours
    verdict = RobotsPolicy(file, ai_tokens=AI_TOKENS).check(url)
    assert not verdict.allowed and verdict.reason == "opted_out"
    assert verdict.detail["robots_token"] == "CCBot" and verdict.detail["robots_rule"] == "Disallow: /photos/"
    assert RobotsPolicy(file, ai_tokens=AI_TOKENS).check(server.url("/about.jpg")).allowed


def test_our_own_group_outranks_the_ai_tokens():
    """A group for our token is the site speaking to us by name: opt-outs
    inferred from other crawlers' groups do not override it."""
    body = AI_OPT_OUT + "\nUser-agent: pairforge\nAllow: /\n"
    policy = RobotsPolicy(RobotsFile("http://h:80", "rules", 200, body), ai_tokens=AI_TOKENS)
    assert policy.check("http://h/photos/cat.jpg").allowed


def test_crawl_delay_is_bounded(site, get):
    server = site({"/robots.txt": text("User-agent: *\nCrawl-delay: 60\n\nUser-agent: pairforge\nCrawl-delay: 4\n")})
    file = fetch_robots(get, origin(server))
    ours, theirs = RobotsPolicy(file), RobotsPolicy(file, token="otherbot")
    assert (ours.crawl_delay, ours.bounded_crawl_delay) == (4.0, 4.0)
    assert (theirs.crawl_delay, theirs.bounded_crawl_delay) == (60.0, 10.0)
    assert RobotsPolicy(file, token="otherbot", max_crawl_delay=2.5).bounded_crawl_delay == 2.5
    cache = RobotsCache(functools.partial(fetch_robots, get), token="otherbot", max_crawl_delay=7)
    assert cache.crawl_delay(origin(server)) == 7.0
    assert RobotsPolicy(RobotsFile("http://h:80", "rules", 200, "User-agent: *\nDisallow: /x\n")).crawl_delay is None
    assert RobotsPolicy(RobotsFile("http://h:80", "rules", 200, RULES)).bounded_crawl_delay == 2.5


# ------------------------------------------------------------ small parts


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://Example.COM/a?b", "http://example.com:80"),
        ("HTTPS://example.com:8443/x", "https://example.com:8443"),
        ("https://user:pw@example.com/", "https://example.com:443"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://b\u00fccher.de/", "http://xn--bcher-kva.de:80"),
        ("ftp://example.com/", None),
        ("http:///nohost", None),
        ("http://example.com:99999/", None),
        ("not a url", None),
        (None, None),
        (42, None),
    ],
)
def test_origin_of(url, expected):
    assert origin_of(url) == expected


def test_robots_file_json_is_checked():
    good = RobotsFile("http://h:80", "rules", 200, "User-agent: *\nDisallow: /\u00e9\n", fetched_at=1.5, truncated=True)
    assert RobotsFile.from_json(good.to_json()) == good
    obj = json.loads(good.to_json())
    for key, bad in [("outcome", "maybe"), ("status", "200"), ("status", True), ("body", None), ("format", 2)]:
        with pytest.raises(ValueError, match=key if key != "format" else "format"):
            RobotsFile.from_json(json.dumps({**obj, key: bad}).encode())
    with pytest.raises(ValueError, match="token"):
        RobotsPolicy(good, token="pair forge")
    with pytest.raises(ValueError, match="url"):
        RobotsPolicy(good).check("http://elsewhere/x")
