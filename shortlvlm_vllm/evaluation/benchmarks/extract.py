"""The choice a free-form reply makes: "yes"/"no", or an option letter; "" when it makes none.

A pruned model drifts from the requested format ("Yes.", "(B)", "The answer is B", the option's text alone), and
crediting or failing such replies moves scores by points, so the rules live here, once, for every benchmark.
They are rule-based, without the GPT judge MMBench falls back on, and stricter than a first-character check: a
reply that names two different choices makes none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

WORD = re.compile(r"[a-z]+")
WORD_OR_DIGIT = re.compile(r"\w+")
LONE_LETTER = re.compile(r"[\W_]*([A-Za-z])[\W_]*")  # "B", "b", "(B)", "B.", "**B**"


def extract_yes_no(reply: str | None) -> str:
    """"yes" or "no" when the reply says exactly one of them as a word, in any case; "" otherwise.

    A lone "y" / "n" counts, as in MME's parser (from Otter). A reply holding both words ("Yes, no") makes no
    choice, rather than being credited with whichever word a parser happens to look at first.
    """
    words = WORD.findall((reply or "").lower())
    if words in (["y"], ["n"]):
        return "yes" if words == ["y"] else "no"
    said = {word for word in words if word in ("yes", "no")}
    return said.pop() if len(said) == 1 else ""


def extract_choice(reply: str | None, options: Mapping[str, str]) -> str:
    """The letter of `options` (letter -> text) a reply picks, or "" when it picks none or several.

    In order: the reply is one letter, in any case and punctuation ("b", "(B)", "B."); exactly one option letter
    stands alone in it, upper case ("The answer is B"; a bare "A" before a lower-case word is the article); of
    several, the first token is one with punctuation ("B. unlike A, ..."); exactly one option's text occurs in it,
    ignoring case (a text inside a longer matching text yields to it: "red square" over "red"). A letter that is not
    among the options is no choice. This is MMBench's rule-based matching (VLMEvalKit's `can_infer`), extended to a
    lower-case lone letter.
    """
    text = (reply or "").strip()
    lone = LONE_LETTER.fullmatch(text)
    if lone:
        letter = lone.group(1).upper()
        return letter if letter in options else ""
    tokens = text.split()
    letters = [_letter(tokens, position) for position in range(len(tokens))]
    named = {letter for letter in letters if letter in options}
    if len(named) == 1:
        return named.pop()
    if named and letters[0] in named and tokens[0] != letters[0]:
        return letters[0]
    return _by_text(text, options)


def _letter(tokens: list[str], position: int) -> str:
    """The upper-case letter a token is ("B", "B.", "(B)"), or "" (also for "A" as the article in "A dog")."""
    token = tokens[position]
    match = LONE_LETTER.fullmatch(token)
    if not match or not match.group(1).isupper():
        return ""
    following = tokens[position + 1] if position + 1 < len(tokens) else ""
    if token == "A" and following[:1].islower():
        return ""
    return match.group(1)


def _by_text(reply: str, options: Mapping[str, str]) -> str:
    lowered = f" {' '.join(WORD_OR_DIGIT.findall(reply.lower()))} "
    found = {
        letter: normal for letter, text in options.items()
        if (normal := " ".join(WORD_OR_DIGIT.findall(str(text).lower()))) and f" {normal} " in lowered
    }
    longest = [letter for letter, normal in found.items()
               if not any(normal != other and f" {normal} " in f" {other} " for other in found.values())]
    return longest[0] if len(longest) == 1 else ""

