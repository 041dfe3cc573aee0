import pytest
import torch

from sparseforge.errors import PatternError
from sparseforge.sparsity import Pattern, detect_nm, pattern_mask, prune_count, satisfies
from sparseforge.sparsity.masks import nm_mask, satisfies_nm, unstructured_mask


def test_parse_unstructured_and_nm():
    assert Pattern.parse("0.7").target_sparsity == pytest.approx(0.7)
    p = Pattern.parse("2:4")
    assert (p.n, p.m, p.target_sparsity) == (2, 4, 0.5)
    assert Pattern.parse("2:8").target_sparsity == 0.75
    assert Pattern.parse("1:4").target_sparsity == 0.75  # SparseLLM's "3:4"
    assert str(Pattern.parse(" 2 : 4 ")) == "2:4"


@pytest.mark.parametrize("text", ["1.0", "-0.1", "1.5", "nan", "abc", "4:2", "0:4", "4:4", "2-4", "a:b", "2:4:8"])
def test_bad_patterns_raise_with_fix(text):
    with pytest.raises(PatternError) as err:
        Pattern.parse(text)
    assert "e.g." in str(err.value) or "need" in str(err.value)


def test_width_must_be_multiple_of_m():
    with pytest.raises(PatternError, match="not a multiple of M=4"):
        Pattern.parse("2:4").check_width(10, "layer.x")
    Pattern.parse("2:4").check_width(12, "layer.x")
    Pattern.parse("0.5").check_width(10, "layer.x")


def test_unstructured_mask_exact_on_hand_matrix():
    scores = torch.tensor([[4.0, 1.0, 3.0], [2.0, 6.0, 5.0]])
    # layer-wide: the 3 smallest are 1, 2, 3
    assert unstructured_mask(scores, 0.5).tolist() == [[False, True, True], [True, False, False]]
    # per row: 1 of 3 per row (round(1.5) = 2 -> check 1/3 instead)
    assert unstructured_mask(scores, 1 / 3, per_row=True).tolist() == [[False, True, False], [True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8), (1, 2)])
def test_nm_mask_satisfies_checker(n, m):
    scores = torch.rand(16, 32, generator=torch.Generator().manual_seed(n * 10 + m))
    pruned = nm_mask(scores, n, m)
    weight = scores.masked_fill(pruned, 0)
    assert satisfies_nm(weight, n, m)
    assert (pruned.reshape(16, -1, m).sum(-1) == m - n).all()
    # the kept ones are the largest of each group
    groups = scores.reshape(16, -1, m)
    kept_min = groups.masked_fill(pruned.reshape(16, -1, m), float("inf")).min(-1).values
    pruned_max = groups.masked_fill(~pruned.reshape(16, -1, m), -float("inf")).max(-1).values
    assert (kept_min >= pruned_max).all()
    assert detect_nm(weight) is not None


def test_checker_rejects_violations():
    w = torch.ones(2, 8)
    w[0, :2] = 0
    assert not satisfies_nm(w, 2, 4)
    w = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    assert satisfies_nm(w, 2, 4) and not satisfies_nm(w, 1, 4)
    assert detect_nm(w) == "2:4"
    assert detect_nm(torch.ones(2, 8)) is None
    assert satisfies(w, Pattern.parse("0.5")) and not satisfies(w, Pattern.parse("0.6"))


def test_pattern_mask_dispatch():
    scores = torch.rand(4, 8)
    assert pattern_mask(scores, Pattern.parse("2:4")).sum() == 16
    assert pattern_mask(scores, Pattern.parse("0.25")).sum() == 8


def test_per_row_mask_breaks_ties_at_the_threshold_by_position():
    # row 0: 3 of 6 pruned; the value 2 ties three times at the threshold, the first two go
    # row 1: no tie at the threshold (the fast path)
    scores = torch.tensor([[1.0, 2.0, 2.0, 4.0, 2.0, 3.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    assert unstructured_mask(scores, 0.5, per_row=True).tolist() == [
        [True, True, True, False, False, False], [False, False, False, True, True, True]]


def test_per_row_mask_counts_with_and_without_ties():
    torch.manual_seed(0)
    continuous = torch.rand(37, 50)
    tied = (continuous * 4).floor()  # values 0..3: many ties at every threshold
    for scores in (continuous, tied):
        for sparsity in (0.3, 0.5, 0.7):
            mask = unstructured_mask(scores, sparsity, per_row=True)
            bounds = [prune_count(r * 50, sparsity) for r in range(38)]
            assert mask.sum(dim=1).tolist() == [b - a for a, b in zip(bounds, bounds[1:])]
            # every pruned score is at most every kept score of its row
            pruned_max = torch.where(mask, scores, -torch.inf).amax(dim=1)
            kept_min = torch.where(mask, torch.inf, scores).amin(dim=1)
            assert (pruned_max <= kept_min).all()
