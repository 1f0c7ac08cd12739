"""The stored reference log-probabilities: read back only under the same key, refused by name otherwise,
never left half-written."""

import numpy as np
import pytest

from megamft.training import reference_logps
from megamft.training.reference_logps import FILE, ReferenceMismatch, load, obtain, save

IDENTITY = {
    "data": {"tasks": {"a": {"a.bin": "1"}}},
    "model": {"load_dir": "/ckpt", "iteration": 100},
}
TABLE = {0: np.array([[-3.5, -4.25], [-1.0, -2.0]]), 1: np.array([[-7.0, -6.5]])}


def test_a_stored_table_reads_back_under_its_key(tmp_path):
    save(tmp_path, IDENTITY, TABLE)
    stored = load(
        tmp_path, {"model": IDENTITY["model"], "data": IDENTITY["data"]}
    )  # key order does not matter
    assert stored.keys() == TABLE.keys() and all(np.array_equal(stored[t], TABLE[t]) for t in TABLE)
    assert [p.name for p in tmp_path.iterdir()] == [FILE]


@pytest.mark.parametrize(
    "changed,named",
    [
        ({"model": {"load_dir": "/ckpt", "iteration": 200}}, "other model"),
        ({"data": {"tasks": {"a": {"a.bin": "2"}}}}, "other data"),
    ],
)
def test_other_data_or_model_is_refused_naming_what_differs(tmp_path, changed, named):
    save(tmp_path, IDENTITY, TABLE)
    with pytest.raises(
        ReferenceMismatch,
        match=f"{tmp_path / FILE}: .* for {named}; use the data and reference model",
    ):
        obtain(
            tmp_path,
            IDENTITY | changed,
            compute_all=lambda: pytest.fail("recomputed"),
            may_compute=True,
        )


def test_a_resume_without_the_file_is_refused(tmp_path):
    with pytest.raises(ReferenceMismatch, match="is missing: a resumed run cannot recompute"):
        obtain(tmp_path, IDENTITY, compute_all=lambda: pytest.fail("recomputed"), may_compute=False)


def test_a_failed_write_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reference_logps.os, "replace", crash)
    with pytest.raises(OSError):
        save(tmp_path, IDENTITY, TABLE)
    assert load(tmp_path, IDENTITY) is None
