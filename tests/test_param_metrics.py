"""Parameter metrics on hand-built updates whose values are known."""

import math

import torch

from harness.param_metrics import (TAU_ABS, Update, frob2_of_product, layer_metrics,
                                   parameter_metrics)
from tests.tolerance import bound

F64 = torch.float64  # every metric is computed in float64


def dense(*rows):
    return {"layer::W": torch.tensor(rows, dtype=torch.float64)}


def test_orthogonal_updates_can_still_collide():
    # Columns of dW1 and dW2 are orthogonal (dW2^T dW1 = 0) yet both fill every position.
    m = parameter_metrics([dense([1, 1], [1, 1]), dense([1, 1], [-1, -1])])
    assert m["AWOM"] == 0.0 and m["ACR"] == 1.0


def test_disjoint_updates_neither_collide_nor_overlap():
    m = parameter_metrics([dense([1, 0], [0, 0]), dense([0, 0], [0, 1])])
    assert m["AWOM"] == 0.0 and m["ACR"] == 0.0


def test_identical_single_entries_collide_on_a_quarter_and_overlap():
    m = parameter_metrics([dense([2, 0], [0, 0]), dense([3, 0], [0, 0])])
    assert m["ACR"] == 0.25 and m["AWOM"] == 36.0  # (3 * 2)^2


def test_tolerances_absolute_and_relative():
    tiny = TAU_ABS / 2  # below the absolute tolerance: not a collision
    m = parameter_metrics([dense([1, tiny], [0, 0]), dense([1, 1], [0, 0])])
    assert m["ACR"] == 0.25
    # Relative: 1e-3 of each matrix's own max; 2e-3 passes for the first, 1e-4 does not.
    m = parameter_metrics([dense([1, 2e-3], [0, 0]), dense([1e3, 1e-1], [0, 0])])
    assert m["ACR"] == 0.5 and m["ACR_rel"] == 0.25


def test_gsr_of_equal_magnitude_entries_is_the_nonzero_fraction():
    W = torch.zeros(4, 4, dtype=torch.float64)
    W[0, 0] = W[1, 2] = W[3, 3] = W[2, 1] = -0.5
    m = layer_metrics([Update(W=W)])
    # entries of +-0.5 in 16: every sum, square root and quotient of the metric is exact
    assert m["GSR_density"] == 4 / 16 and m["GSR_hoyer"] == 0.5
    full = layer_metrics([Update(W=torch.ones(3, 5, dtype=torch.float64))])
    # 15 / (sqrt(15) |W|): two square roots, a product and a quotient round
    assert abs(full["GSR_hoyer"] - 1.0) <= bound(1.0, ops=4, dtype=F64)


def test_orthogonal_overlap_of_down_projections():
    A1, A2 = torch.tensor([[1.0, 0, 0]]), torch.tensor([[1.0, 1, 0]])
    B = torch.ones(2, 1)
    m = parameter_metrics([{"l::A": A1, "l::B": B}, {"l::A": A2, "l::B": B}])
    assert m["OO"] == 1.0 and m["OO_normalised"] == 0.5  # small integers: exact
    assert m["OO_pairwise"] == [[1.0, 1.0], [1.0, 4.0]]  # ||A_2 A_2^T||^2 = 2^2
    # A dense layer has no down-projection: OO is not defined there.
    assert "OO" not in parameter_metrics([dense([1, 0], [0, 1]), dense([1, 0], [0, 1])])


def test_factored_routes_equal_the_materialised_matrices():
    g = torch.Generator().manual_seed(0)
    x = Update(B=torch.randn(12, 3, generator=g, dtype=torch.float64),
               A=torch.randn(3, 9, generator=g, dtype=torch.float64))
    y = Update(B=torch.randn(12, 3, generator=g, dtype=torch.float64),
               A=torch.randn(3, 9, generator=g, dtype=torch.float64))
    dense = float((x.dense().T @ y.dense()).pow(2).sum())
    # the dense route's longest chain: B A (3 terms), a 12-term product, doubled by the square, the
    # 81-term sum; the factored one's is shorter. Of the terms' magnitude: the same on |B|, |A|
    terms = float(((x.B.abs() @ x.A.abs()).T @ (y.B.abs() @ y.A.abs())).pow(2).sum())
    assert abs(frob2_of_product(x, y) - dense) <= bound(terms, ops=3 + 2 * 12 + 81, dtype=F64)
    # each of the 9 singular values of the 12 x 9 product is exact to 12 eps sigma_1 (six of
    # them are that rounding, rank 3), the factored route's two QRs and its product likewise
    singular = torch.linalg.svdvals(x.dense())
    assert abs(x.nuclear_norm() - float(singular.sum())) <= bound(singular[0], ops=9 * 12 + 3 * 12,
                                                                  dtype=F64)


def test_aggregation_over_layers_and_single_task():
    two_layers = [{"a::W": torch.eye(2), "b::W": torch.ones(2, 2)},
                  {"a::W": torch.eye(2), "b::W": torch.zeros(2, 2) + 1e-9}]
    m = parameter_metrics(two_layers)
    assert m["layers"] == 2
    assert m["ACR"] == (0.5 + 0.0) / 2 and m["ACR_sum"] == 0.5  # fractions of counts: exact
    one = parameter_metrics([{"a::W": torch.eye(3)}])
    assert "ACR" not in one and one["nuclear_norm_per_task"] == [3.0]
    # |W| = sqrt(3), a product, a quotient; and the expected's three roundings
    assert abs(one["GSR_hoyer"] - 3 / (3 * math.sqrt(3))) <= bound(1.0, ops=6, dtype=F64)
    assert parameter_metrics([]) is None
