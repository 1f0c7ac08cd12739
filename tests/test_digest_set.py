"""--dedup's table of seen samples: the same first occurrences as a Python set of the digests, in a
fraction of its memory."""

import hashlib
import sys

import numpy as np

from megamft.data.digest_set import DigestSet


def _digests(values) -> list[bytes]:
    return [hashlib.blake2b(str(v).encode(), digest_size=12).digest() for v in values]


def test_first_occurrences_equal_a_python_sets_across_batches_and_growth():
    rng = np.random.default_rng(0)
    table, reference = DigestSet(capacity=8), set()  # starts tiny: grows many times
    for batch in range(60):
        values = rng.integers(0, 3000, int(rng.integers(0, 400))).tolist()  # repeats within a batch
        digests = _digests(values)
        expected = []
        for index, digest in enumerate(digests):
            if digest not in reference:
                reference.add(digest)
                expected.append(index)
        assert table.first_seen(digests) == expected, batch
    assert len(table) == len(reference) > 2500


def test_digests_that_share_a_slot_or_their_first_eight_bytes_stay_apart():
    table = DigestSet(capacity=4)
    same_start = [bytes(8) + i.to_bytes(4, "little") for i in range(5)]
    same_slot = [(i << 40).to_bytes(8, "little") + bytes(4) for i in range(1, 6)]
    assert table.first_seen(same_start + same_slot) == list(range(10))
    assert table.first_seen(same_start[::-1] + same_slot) == []


def test_a_digest_takes_a_fraction_of_a_python_sets_memory():
    digests = _digests(range(200_000))
    table = DigestSet()
    table.first_seen(digests)
    reference = set(digests)
    set_bytes = sys.getsizeof(reference) + sum(sys.getsizeof(d) for d in digests)
    assert table.nbytes / len(digests) <= 52  # at most half full after growth: 13 bytes a slot
    assert table.nbytes < set_bytes / 2
