import numpy as np
import pytest

from beam_extract.batching import bucket_length, make_batch
from beam_extract.options import parse_layers, parse_sites
from beam_extract.tokenize import Sample


def sample(n, name="s"):
    return Sample(name, np.arange(1, n + 1, dtype=np.int32), "in.jsonl", 1)


@pytest.mark.parametrize("n, expected", [(1, 128), (128, 128), (129, 256), (1000, 1024), (8000, 8064), (8192, 8192)])
def test_bucket_length(n, expected):
    assert bucket_length(n, 8192) == expected


def test_bucket_is_capped_at_max_seq_len():
    assert bucket_length(300, 300) == 300


def test_make_batch_has_static_shape_and_marks_padding():
    batch = make_batch([sample(3, "a"), sample(5, "b")], batch_size=4, length=8)
    assert batch.tokens.shape == batch.positions.shape == batch.segment_ids.shape == (4, 8)
    assert batch.tokens.dtype == np.int32
    np.testing.assert_array_equal(batch.tokens[1], [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(batch.segment_ids.sum(axis=1), [3, 5, 0, 0])
    assert [s.sample_id for s in batch.samples] == ["a", "b"]
    with pytest.raises(ValueError):
        make_batch([sample(9)], batch_size=4, length=8)
    with pytest.raises(ValueError):
        make_batch([sample(2)] * 5, batch_size=4, length=8)


def test_layer_and_site_options():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("3, 0-1", 4) == (0, 1, 3)
    for bad in ("4", "x", "2-9", "-1"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 4)
    assert parse_sites("resid_post,mlp_out,resid_post") == ("resid_post", "mlp_out")
    with pytest.raises(ValueError, match="--sites"):
        parse_sites("resid,mlp_out")
