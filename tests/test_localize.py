"""Localization methods on statistics built by hand."""

from __future__ import annotations

import math

import pytest
import torch

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.localize import LOCALIZERS, LayerStatistics, layers_to_prune, localize, parse_candidates

COSINE_METHODS = ["tis", "all-tokens", "text-only", "visual-only"]
L = 8


def make_stats(cosine: dict[int, float] | None = None, angular: torch.Tensor | None = None) -> LayerStatistics:
    """Statistics for L layers: the same cosine per layer in every token set, and an angular matrix."""
    cosine = cosine if cosine is not None else {layer: 0.5 for layer in range(L)}
    if angular is None:
        angular = torch.full((L, L), math.nan, dtype=torch.float64)
        for first in range(L):
            for last in range(first, L):
                angular[first, last] = 0.1 * (last - first + 1)
    return LayerStatistics(
        num_layers=L,
        num_samples=4,
        cosine={name: dict(cosine) for name in COSINE_METHODS},
        angular=angular,
        features=torch.zeros(L, 4, 16),
    )


def test_registry_names():
    assert set(LOCALIZERS) == {*COSINE_METHODS, "angular-block", "random", "last"}
    assert all(loc.name == name for name, loc in LOCALIZERS.items())


@pytest.mark.parametrize("method", COSINE_METHODS)
def test_identity_layer_is_most_redundant(method):
    cosine = {layer: 0.2 + 0.05 * layer for layer in range(L)}
    cosine[2] = 1.0  # x_out == x_in: the layer does nothing
    stats = make_stats(cosine)
    pruned, scores = localize(method, stats, 1, range(L))
    assert pruned == [2]
    assert scores == {layer: cosine[layer] for layer in range(L)}


@pytest.mark.parametrize("method", COSINE_METHODS)
def test_cosine_reads_its_own_token_set(method):
    stats = make_stats({layer: 0.5 for layer in range(L)})
    stats.cosine[method] = {layer: 0.1 * layer for layer in range(L)}
    stats.cosine[method][1] = 0.99
    assert localize(method, stats, 2, range(L))[0] == [1, 7]


def test_cosine_takes_top_n_individual_layers_sorted():
    cosine = {0: 0.1, 1: 0.9, 2: 0.2, 3: 0.8, 4: 0.3, 5: 0.95, 6: 0.0, 7: 0.4}
    pruned, scores = localize("tis", make_stats(cosine), 3, range(L))
    assert pruned == [1, 3, 5]
    assert set(scores) == set(range(L))


def test_cosine_ties_go_to_the_later_layer():
    cosine = {layer: 0.5 for layer in range(L)}
    cosine[1] = cosine[4] = cosine[6] = 0.9
    assert localize("tis", make_stats(cosine), 2, range(L))[0] == [4, 6]
    assert localize("tis", make_stats({layer: 0.5 for layer in range(L)}), 3, range(L))[0] == [5, 6, 7]


def test_cosine_only_considers_candidates():
    cosine = {layer: 0.1 * layer for layer in range(L)}
    pruned, scores = localize("all-tokens", make_stats(cosine), 2, [1, 2, 3])
    assert pruned == [2, 3]
    assert set(scores) == {1, 2, 3}


def test_angular_block_finds_the_best_block_not_the_best_single_layers():
    angular = torch.full((L, L), math.nan, dtype=torch.float64)
    for first in range(L):
        for last in range(first, L):
            angular[first, last] = 0.3 + 0.05 * (last - first)
    # Layers 1 and 6 are the best single layers, but not adjacent; block 3-4 is the best pair.
    angular[1, 1] = angular[6, 6] = 0.01
    angular[3, 4] = 0.05
    stats = make_stats(angular=angular)
    pruned, scores = localize("angular-block", stats, 2, range(L))
    assert pruned == [3, 4]
    assert scores[1] == pytest.approx(0.99)
    assert localize("tis", make_stats({layer: scores[layer] for layer in range(L)}), 2, range(L))[0] == [1, 6]


def test_angular_block_compares_first_input_to_last_output():
    angular = torch.full((L, L), math.nan, dtype=torch.float64)
    for first in range(L):
        for last in range(first, L):
            angular[first, last] = 0.5
    angular[2, 4] = 0.1
    assert localize("angular-block", make_stats(angular=angular), 3, range(L))[0] == [2, 3, 4]


def test_angular_block_ties_go_to_the_later_block():
    assert localize("angular-block", make_stats(), 2, range(L))[0] == [6, 7]


def test_angular_block_lies_inside_the_candidates():
    angular = torch.full((L, L), 0.5, dtype=torch.float64)
    angular[2, 3] = 0.01  # the best block overall, but layer 2 is no candidate
    angular[5, 6] = 0.2
    pruned, _ = localize("angular-block", make_stats(angular=angular), 2, [0, 3, 5, 6, 7])
    assert pruned == [5, 6]


def test_angular_block_without_a_contiguous_run_is_refused():
    with pytest.raises(ShortLVLMError, match="contiguous"):
        localize("angular-block", make_stats(), 3, [0, 2, 4, 5, 7])


def test_random_is_seeded_distinct_and_sorted():
    stats = make_stats()
    candidates = list(range(L))
    first, scores = localize("random", stats, 4, candidates, seed=1)
    assert scores == {}
    assert first == localize("random", stats, 4, candidates, seed=1)[0]
    assert first == sorted(set(first)) and len(first) == 4 and set(first) <= set(candidates)
    draws = {tuple(localize("random", stats, 4, candidates, seed=s)[0]) for s in range(20)}
    assert len(draws) > 1


def test_last_takes_the_last_candidates():
    pruned, scores = localize("last", make_stats(), 3, [7, 1, 4, 5, 2])
    assert pruned == [4, 5, 7]
    assert scores == {}


def test_unknown_method_lists_the_names():
    with pytest.raises(ShortLVLMError, match="unknown localization method 'cosine'") as info:
        localize("cosine", make_stats(), 1, range(L))
    assert all(name in str(info.value) for name in LOCALIZERS)


@pytest.mark.parametrize(("ratio", "layers", "expected"), [(0.25, 32, 8), (0.3, 32, 10), (0.1, 40, 4), (0.5, 8, 4)])
def test_layers_to_prune(ratio, layers, expected):
    assert layers_to_prune(ratio, layers, layers // 2) == expected


@pytest.mark.parametrize("ratio", [0, -0.1])
def test_layers_to_prune_needs_a_positive_ratio(ratio):
    with pytest.raises(ShortLVLMError, match="ratio must be > 0"):
        layers_to_prune(ratio, 32, 16)


def test_layers_to_prune_above_half_needs_force():
    with pytest.raises(ShortLVLMError, match=r"ratio <= 0\.5.*--force"):
        layers_to_prune(0.6, 10, 10)
    assert layers_to_prune(0.6, 10, 10, force=True) == 6


@pytest.mark.parametrize("ratio", [1, 1.5])
def test_layers_to_prune_refuses_whole_model_even_forced(ratio):
    with pytest.raises(ShortLVLMError, match="ratio must be < 1"):
        layers_to_prune(ratio, 10, 10, force=True)


def test_layers_to_prune_refuses_rounding_to_every_layer():
    with pytest.raises(ShortLVLMError, match="all 10"):
        layers_to_prune(0.97, 10, 10, force=True)


def test_layers_to_prune_too_small_names_the_ratio_that_works():
    with pytest.raises(ShortLVLMError, match=r"rounds to 0 layers.*1/32 = 0\.03125"):
        layers_to_prune(0.01, 32, 16)
    assert layers_to_prune(1 / 32, 32, 16) == 1


def test_layers_to_prune_more_than_candidates_suggests_candidates():
    with pytest.raises(ShortLVLMError, match="only 4 are candidates.*--candidates"):
        layers_to_prune(0.25, 32, 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]),
        ("16-19", [16, 17, 18, 19]),
        ("3,5,7", [3, 5, 7]),
        ("3,10-12", [3, 10, 11, 12]),
        (" 12 - 13 , 2 ", [2, 12, 13]),
        ("5,4-6", [4, 5, 6]),
        ("0-31", list(range(32))),
        ("7-7", [7]),
    ],
)
def test_parse_candidates(text, expected):
    assert parse_candidates(text, 32) == expected


def test_parse_candidates_default_odd_layer_count():
    assert parse_candidates(None, 7) == [3, 4, 5, 6]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot read"),
        ("3,,4", "cannot read"),
        ("a-b", "cannot read"),
        ("-3", "cannot read"),
        ("3.5", "cannot read"),
        ("32", "out of range"),
        ("30-40", "out of range"),
        ("9-4", "backwards"),
    ],
)
def test_parse_candidates_errors(text, message):
    with pytest.raises(ShortLVLMError, match=message):
        parse_candidates(text, 32)
