import numpy as np
import pytest

from wmtrace.coding import codes

KEY = bytes(range(32))
SPEC = codes.CodeSpec()


def check_for(issued):
    def check(data):
        buyer = codes.verify(KEY, "m", data)
        return buyer if buyer in issued else None

    return check


def soft_of(buyer_id):
    return 2.0 * codes.codeword(KEY, "m", buyer_id, SPEC) - 1.0


def test_codewords_are_distinct_and_keyed():
    words = {codes.codeword(KEY, "m", i, SPEC).tobytes() for i in range(1, 51)}
    assert len(words) == 50
    other_key = codes.codeword(b"\x00" * 32, "m", 1, SPEC)
    assert not np.array_equal(other_key, codes.codeword(KEY, "m", 1, SPEC))


def test_clean_decode_names_buyer_with_tiny_false_positive():
    d = codes.decode(soft_of(7), SPEC, check_for({7}), candidates=50)
    assert d is not None and d.buyer_id == 7
    assert d.bit_errors == 0 and d.symbol_errors == 0
    assert d.false_positive_probability < 1e-15


def test_corrects_symbol_errors_up_to_half_the_parity():
    soft = soft_of(3)
    rng = np.random.default_rng(1)
    flipped_symbols = rng.choice(SPEC.symbols, size=SPEC.parity // 2, replace=False)
    for s in flipped_symbols:
        soft[8 * s] *= -1
    d = codes.decode(soft, SPEC, check_for({3}), candidates=10)
    assert d is not None and d.buyer_id == 3 and d.bit_errors == len(flipped_symbols)


def test_low_reliability_errors_become_erasures():
    # More flipped symbols than errors-only decoding can fix, but the flipped bits are weak.
    soft = soft_of(3)
    for s in range(18):
        soft[8 * s] = -0.01 * np.sign(soft[8 * s])
    assert codes.decode(soft, SPEC, check_for({3}), 10) is not None


def test_missing_layer_is_erasures():
    soft = soft_of(9)
    soft[: SPEC.bits // 2] = np.nan
    d = codes.decode(soft, SPEC, check_for({9}), 50)
    assert d is not None and d.buyer_id == 9 and d.erasures >= 16


def test_random_bits_never_accuse():
    rng = np.random.default_rng(0)
    issued = set(range(1, 51))
    for _ in range(200):
        assert codes.decode(rng.normal(size=SPEC.bits), SPEC, check_for(issued), 50) is None


def test_unregistered_buyer_or_wrong_tag_is_not_named():
    assert codes.decode(soft_of(5), SPEC, check_for({1, 2}), 2) is None
    data = bytearray(codes.payload(KEY, "m", 5))
    data[-1] ^= 1
    assert codes.verify(KEY, "m", bytes(data)) is None


def test_all_missing_decodes_to_nothing():
    assert codes.decode(np.zeros(SPEC.bits), SPEC, check_for({1}), 1) is None


def test_false_positive_bound_grows_with_erasures_and_candidates():
    a = codes.chance_of_match(SPEC, 0, 12, 50)
    b = codes.chance_of_match(SPEC, 10, 7, 50)
    assert a < b < 1e-15
    assert codes.chance_of_match(SPEC, 0, 12, 5000) == pytest.approx(100 * a)
