"""Decode-graph batch sizes and padding (pure); the graphs themselves are checked in test_triton_backend."""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.cuda_graph import capture_sizes, padded_size


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 4 + 16
    with pytest.raises(ValueError, match="positive"):
        capture_sizes(0)


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 40, 256])
def test_padded_size_is_the_smallest_captured_size_that_fits(max_num_seqs):
    sizes = capture_sizes(max_num_seqs)
    for n in range(1, max_num_seqs + 1):
        size = padded_size(n, sizes)
        assert size in sizes and size >= n
        assert all(s < n for s in sizes if s < size)
    assert padded_size(max_num_seqs + 1, sizes) is None  # above the largest: eager
