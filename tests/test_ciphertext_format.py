"""The Encrypt/Decrypt ciphertext format (DESIGN.md §3, valv.core.crypto.ciphertext)."""

from __future__ import annotations

import os
import struct
import threading

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valv.core.crypto import (
    CiphertextCodec,
    CiphertextWriter,
    InvalidCiphertextError,
    SecretBytes,
    SubkeyCache,
    derive_subkey,
    generate_kek,
    read_version_id,
)
from valv.core.crypto.ciphertext import HEADER_LEN, MIN_CIPHERTEXT_LEN

KEY = "projects/p/locations/global/keyRings/r/cryptoKeys/k"
OTHER_KEY = "projects/p/locations/global/keyRings/r/cryptoKeys/k2"
KEK = bytes(range(1, 33))
OTHER_KEK = bytes(range(2, 34))

FAST = settings(
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def codec() -> CiphertextCodec:
    return CiphertextCodec()


def _enc(codec: CiphertextCodec, pt: bytes = b"hello world", aad: bytes = b"ctx", *, v: int = 7):
    return codec.encrypt(KEK, key_name=KEY, version_id=v, plaintext=pt, aad=aad)


def _dec(codec: CiphertextCodec, ct: bytes, aad: bytes = b"ctx", *, v: int = 7, kek=KEK, key=KEY):
    return codec.decrypt(kek, key_name=key, version_id=v, ciphertext=ct, aad=aad)


# -- an independent implementation of the documented format -------------------


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _ref_subkey(kek: bytes, name: str, version_id: int, salt: bytes) -> bytes:
    info = b"valv/aead/v1" + _lp(name.encode()) + struct.pack(">I", version_id)
    return HKDF(hashes.SHA256(), 32, salt, info).derive(kek)


def _ref_encrypt(kek, name, version_id, salt, nonce, pt, aad) -> bytes:
    header = bytes([1]) + struct.pack(">I", version_id) + salt
    gcm_aad = _lp(header) + _lp(name.encode()) + _lp(aad)
    return (
        header
        + nonce
        + AESGCM(_ref_subkey(kek, name, version_id, salt)).encrypt(nonce, pt, gcm_aad)
    )


def _ref_decrypt(kek, name, ct, aad) -> bytes:
    header, nonce, body = ct[:21], ct[21:33], ct[33:]
    version_id = struct.unpack(">I", header[1:5])[0]
    gcm_aad = _lp(header) + _lp(name.encode()) + _lp(aad)
    return AESGCM(_ref_subkey(kek, name, version_id, header[5:21])).decrypt(nonce, body, gcm_aad)


def test_reference_implementation_reads_our_output(codec):
    ct = _enc(codec, b"secret", b"aad")
    assert _ref_decrypt(KEK, KEY, ct, b"aad") == b"secret"


def test_we_read_reference_output(codec):
    salt, nonce = bytes(range(16)), bytes(range(100, 112))
    ct = _ref_encrypt(KEK, KEY, 42, salt, nonce, b"from the spec", b"a")
    assert codec.decrypt(KEK, key_name=KEY, version_id=42, ciphertext=ct, aad=b"a") == (
        b"from the spec"
    )


def test_known_answer_vector(codec):
    """Pins the format: any change to derivation or AAD encoding breaks this."""
    salt, nonce = bytes(16), bytes(12)
    ct = _ref_encrypt(KEK, KEY, 1, salt, nonce, b"", b"")
    assert ct[:33] == b"\x01\x00\x00\x00\x01" + bytes(28)
    assert _dec(codec, ct, b"", v=1) == b""
    assert derive_subkey(KEK, key_name=KEY, version_id=1, salt=salt) == _ref_subkey(
        KEK, KEY, 1, salt
    )
    # Hard-coded, computed once from the reference implementation above.
    assert derive_subkey(KEK, key_name=KEY, version_id=1, salt=salt).hex() == (_KNOWN_SUBKEY_HEX)


_KNOWN_SUBKEY_HEX = "10b7ed7da3c77e8cb49349add3283059eaa368ee2fa6f1d4082dea8ae0b3fc16"
# KEK, KEY, version 1, zero salt, zero nonce, plaintext b"kat", aad b"a".
_KNOWN_CIPHERTEXT_HEX = (
    "0100000001" + "00" * 16 + "00" * 12 + "619505e05d88ea236afec0d6cf7ae9ac1ee8e2"
)


def test_known_answer_ciphertext(codec):
    ct = bytes.fromhex(_KNOWN_CIPHERTEXT_HEX)
    assert _dec(codec, ct, b"a", v=1) == b"kat"


# -- header layout ------------------------------------------------------------


def test_header_layout_byte_by_byte(codec):
    pt = b"x" * 10
    cts = [
        codec.encrypt(KEK, key_name=KEY, version_id=0x01020304, plaintext=pt, aad=b"")
        for _ in range(3)
    ]
    salt = codec.writer.salt
    for i, ct in enumerate(cts):
        assert len(ct) == HEADER_LEN + len(pt) + 16
        assert ct[0] == 1
        assert ct[1:5] == b"\x01\x02\x03\x04"
        assert ct[5:21] == salt
        assert ct[21:33] == i.to_bytes(12, "big")
        assert read_version_id(ct) == 0x01020304


def test_salt_is_random_per_writer():
    assert CiphertextWriter().salt != CiphertextWriter().salt


def test_nonce_counter_is_shared_across_keys(codec):
    a = codec.encrypt(KEK, key_name=KEY, version_id=1, plaintext=b"a", aad=b"")
    b = codec.encrypt(OTHER_KEK, key_name=OTHER_KEY, version_id=9, plaintext=b"b", aad=b"")
    assert a[5:21] == b[5:21]
    assert int.from_bytes(b[21:33], "big") == int.from_bytes(a[21:33], "big") + 1


def test_salt_rollover_after_limit():
    codec = CiphertextCodec(max_messages_per_salt=3)
    cts = [_enc(codec, b"m%d" % i) for i in range(7)]
    salts = [ct[5:21] for ct in cts]
    counters = [int.from_bytes(ct[21:33], "big") for ct in cts]
    assert salts[0] == salts[1] == salts[2]
    assert salts[3] == salts[4] == salts[5]
    assert salts[3] != salts[0]
    assert salts[6] not in (salts[0], salts[3])
    assert counters == [0, 1, 2, 0, 1, 2, 0]
    assert codec.writer.salts_chosen == 3
    for i, ct in enumerate(cts):
        assert _dec(codec, ct) == b"m%d" % i


def test_limit_bounds():
    with pytest.raises(ValueError):
        CiphertextWriter(max_messages_per_salt=0)
    with pytest.raises(ValueError):
        CiphertextWriter(max_messages_per_salt=2**32 + 1)
    assert CiphertextWriter().max_messages_per_salt == 2**32


def test_threads_never_share_a_nonce():
    codec = CiphertextCodec(max_messages_per_salt=250)
    out: list[bytes] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [_enc(codec, b"t") for _ in range(200)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 1600
    pairs = {ct[5:33] for ct in out}
    assert len(pairs) == 1600
    by_salt: dict[bytes, list[int]] = {}
    for ct in out:
        by_salt.setdefault(ct[5:21], []).append(int.from_bytes(ct[21:33], "big"))
    for counters in by_salt.values():
        assert sorted(counters) == list(range(len(counters)))
        assert len(counters) <= 250
    assert all(_dec(codec, ct) == b"t" for ct in out)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_gives_new_salt(codec):
    parent_ct = _enc(codec)
    parent_salt = codec.writer.salt
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(r)
            hook_salt = codec.writer.salt  # reset by the at-fork hook already
            ct = _enc(codec)
            os.write(w, hook_salt + ct[:HEADER_LEN])
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1024):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    hook_salt, child_header = data[:16], data[16:]
    assert len(child_header) == HEADER_LEN
    assert hook_salt != parent_salt
    assert child_header[5:21] == hook_salt
    assert child_header[21:33] == bytes(12)  # counter restarted
    # Parent carries on with its own salt and counter.
    again = _enc(codec)
    assert again[5:21] == parent_salt == parent_ct[5:21]
    assert int.from_bytes(again[21:33], "big") == 1


def test_pid_check_without_hook(codec, monkeypatch):
    """Even if the at-fork hook did not run, a pid change forces a new salt."""
    first = _enc(codec)
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    second = _enc(codec)
    assert second[5:21] != first[5:21]
    assert second[21:33] == bytes(12)


# -- round trips --------------------------------------------------------------


@FAST
@given(pt=st.binary(max_size=2048), aad=st.binary(max_size=256), v=st.integers(1, 2**32 - 1))
def test_round_trip(pt, aad, v):
    codec = _SHARED
    ct = codec.encrypt(KEK, key_name=KEY, version_id=v, plaintext=pt, aad=aad)
    assert read_version_id(ct) == v
    assert len(ct) == MIN_CIPHERTEXT_LEN + len(pt)
    assert codec.decrypt(KEK, key_name=KEY, version_id=v, ciphertext=ct, aad=aad) == pt


_SHARED = CiphertextCodec()


def test_secretbytes_kek_and_bytearray_inputs(codec):
    kek = generate_kek()
    ct = codec.encrypt(
        kek, key_name=KEY, version_id=3, plaintext=bytearray(b"pt"), aad=memoryview(b"a")
    )
    assert (
        codec.decrypt(bytes(kek), key_name=KEY, version_id=3, ciphertext=bytearray(ct), aad=b"a")
        == b"pt"
    )


def test_separate_codecs_interoperate():
    a, b = CiphertextCodec(), CiphertextCodec()
    ct = _enc(a, b"shared")
    assert _dec(b, ct) == b"shared"
    # The reader cached the subkey after authenticating: the second read hits.
    assert (b.cache.misses, b.cache.hits, len(b.cache)) == (1, 0, 1)
    assert _dec(b, ct) == b"shared"
    assert (b.cache.misses, b.cache.hits) == (1, 1)


# -- tampering ----------------------------------------------------------------


def test_every_single_bit_flip_fails(codec):
    ct = _enc(codec, b"0123456789abcdef0123")
    for i in range(len(ct)):
        for bit in range(8):
            bad = bytearray(ct)
            bad[i] ^= 1 << bit
            with pytest.raises(InvalidCiphertextError):
                _dec(codec, bytes(bad))
    assert _dec(codec, ct) == b"0123456789abcdef0123"


def test_every_truncation_fails(codec):
    ct = _enc(codec, b"some plaintext")
    for n in range(len(ct)):
        with pytest.raises(InvalidCiphertextError):
            _dec(codec, ct[:n])


def test_empty_plaintext_truncation_fails(codec):
    ct = _enc(codec, b"")
    assert len(ct) == MIN_CIPHERTEXT_LEN
    assert _dec(codec, ct) == b""
    for n in range(len(ct)):
        with pytest.raises(InvalidCiphertextError):
            _dec(codec, ct[:n])


@FAST
@given(extra=st.binary(min_size=1, max_size=64))
def test_any_extension_fails(extra):
    ct = _enc(_SHARED, b"payload")
    with pytest.raises(InvalidCiphertextError):
        _dec(_SHARED, ct + extra)
    with pytest.raises(InvalidCiphertextError):
        _dec(_SHARED, extra + ct)


@FAST
@given(data=st.binary(max_size=200))
def test_garbage_fails_cleanly(data):
    with pytest.raises(InvalidCiphertextError) as info:
        _dec(_SHARED, data)
    assert str(info.value) == InvalidCiphertextError.MESSAGE


@FAST
@given(tail=st.binary(min_size=MIN_CIPHERTEXT_LEN - 5, max_size=200))
def test_garbage_with_valid_prefix_fails_cleanly(tail):
    data = b"\x01\x00\x00\x00\x07" + tail
    assert read_version_id(data) == 7
    with pytest.raises(InvalidCiphertextError):
        _dec(_SHARED, data)


def test_garbage_is_not_cached(codec):
    before = len(codec.cache)
    for i in range(50):
        with pytest.raises(InvalidCiphertextError):
            _dec(codec, b"\x01\x00\x00\x00\x07" + os.urandom(16) + bytes(12 + 16 + i))
    assert len(codec.cache) == before


def test_wrong_key_name_aad_kek_version_fail(codec):
    ct = _enc(codec, b"pt", b"aad")
    assert _dec(codec, ct, b"aad") == b"pt"
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, ct, b"aad", key=OTHER_KEY)
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, ct, b"aaD")
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, ct, b"")
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, ct, b"aad", kek=OTHER_KEK)
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, ct, b"aad", v=8)


def test_edited_version_header_fails(codec):
    """Rewriting the version id in the header (with the same KEK) fails."""
    ct = _enc(codec, b"pt", v=7)
    forged = ct[:1] + struct.pack(">I", 8) + ct[5:]
    with pytest.raises(InvalidCiphertextError):
        _dec(codec, forged, v=8)


def test_aad_piece_boundaries_are_unambiguous(codec):
    """lp() encoding: moving bytes between key name and AAD must fail."""
    ct = codec.encrypt(KEK, key_name="ab", version_id=1, plaintext=b"x", aad=b"c")
    with pytest.raises(InvalidCiphertextError):
        codec.decrypt(KEK, key_name="a", version_id=1, ciphertext=ct, aad=b"bc")
    with pytest.raises(InvalidCiphertextError):
        codec.decrypt(KEK, key_name="abc", version_id=1, ciphertext=ct, aad=b"")


# -- read_version_id ----------------------------------------------------------


def test_read_version_id_rejects_bad_headers():
    body = bytes(16 + 12 + 16)
    assert read_version_id(b"\x01\xff\xff\xff\xff" + body) == 2**32 - 1
    for bad in (
        b"",
        b"\x01",
        b"\x01\x00\x00\x00\x01" + body[:-1],  # one byte short
        b"\x02\x00\x00\x00\x01" + body,  # unknown format version
        b"\x00\x00\x00\x00\x01" + body,
        b"\x01\x00\x00\x00\x00" + body,  # version id 0
    ):
        with pytest.raises(InvalidCiphertextError):
            read_version_id(bad)


# -- programming errors are not InvalidCiphertextError ------------------------


def test_bad_server_side_arguments(codec):
    with pytest.raises(ValueError, match="32 bytes"):
        codec.encrypt(b"short", key_name=KEY, version_id=1, plaintext=b"", aad=b"")
    with pytest.raises(ValueError, match="all-zero"):
        codec.encrypt(bytes(32), key_name=KEY, version_id=1, plaintext=b"", aad=b"")
    with pytest.raises(ValueError):
        codec.encrypt(KEK, key_name=KEY, version_id=0, plaintext=b"", aad=b"")
    with pytest.raises(ValueError):
        codec.encrypt(KEK, key_name=KEY, version_id=2**32, plaintext=b"", aad=b"")
    with pytest.raises(ValueError, match="CryptoKey name"):
        codec.encrypt(
            KEK, key_name=KEY + "/cryptoKeyVersions/1", version_id=1, plaintext=b"", aad=b""
        )
    with pytest.raises(TypeError):
        codec.encrypt(KEK, key_name=KEY, version_id=1, plaintext="text", aad=b"")  # type: ignore[arg-type]
    kek = SecretBytes(KEK)
    kek.zeroize()
    with pytest.raises(ValueError, match="zeroized"):
        codec.encrypt(kek, key_name=KEY, version_id=1, plaintext=b"", aad=b"")


# -- subkey cache -------------------------------------------------------------


def test_cache_hits_and_key_never_raw_kek(codec):
    ct = _enc(codec)  # writer derives and caches
    misses = codec.cache.misses
    for _ in range(5):
        assert _dec(codec, ct) == b"hello world"
    assert codec.cache.misses == misses
    assert codec.cache.hits >= 5
    for key in codec.cache._cache:
        assert KEK not in key
        assert len(key[0]) == 32  # sha256 digest


def test_cache_ttl_and_bound():
    now = [0.0]
    codec = CiphertextCodec(cache_maxsize=4, cache_ttl_seconds=10, timer=lambda: now[0])
    ct = _enc(codec)
    assert len(codec.cache) == 1
    now[0] = 11.0
    assert len(codec.cache) == 0
    assert _dec(codec, ct) == b"hello world"  # re-derived
    for v in range(1, 20):
        codec.encrypt(KEK, key_name=KEY, version_id=v, plaintext=b"", aad=b"")
    assert len(codec.cache) == 4


def test_cache_evict_version_and_clear(codec):
    codec.encrypt(KEK, key_name=KEY, version_id=1, plaintext=b"", aad=b"")
    codec.encrypt(KEK, key_name=KEY, version_id=2, plaintext=b"", aad=b"")
    assert codec.cache.evict_version(KEY, 1) == 1
    assert len(codec.cache) == 1
    codec.cache.clear()
    assert len(codec.cache) == 0


def test_evict_version_after_the_cache_dropped_keys_by_itself():
    """The per-version index outlives entries the LRU bound dropped, and is rebuilt
    once it holds more than 4 x maxsize keys; eviction stays exact throughout."""
    cache = SubkeyCache(maxsize=4)
    codecs = [CiphertextWriter(cache=cache) for _ in range(30)]  # 30 salts
    for writer in codecs:
        for version in (1, 2):
            writer.encrypt(KEK, key_name=KEY, version_id=version, plaintext=b"", aad=b"")
    assert len(cache) == 4 and cache._indexed <= 4 * 4 + 1
    live_v2 = sum(1 for ck in cache._cache if ck[2] == 2)
    assert cache.evict_version(KEY, 2) == live_v2
    assert all(ck[2] == 1 for ck in cache._cache)
    assert cache.evict_version(KEY, 2) == 0
    live_v1 = len(cache)
    assert cache.evict_version(KEY, 1) == live_v1
    assert len(cache) == 0 and cache._indexed == 0


def test_writer_with_own_cache():
    w = CiphertextWriter(cache=SubkeyCache(maxsize=2))
    ct = w.encrypt(KEK, key_name=KEY, version_id=1, plaintext=b"w", aad=b"")
    assert (
        CiphertextCodec().decrypt(KEK, key_name=KEY, version_id=1, ciphertext=ct, aad=b"") == b"w"
    )
    assert "redacted" not in repr(w) and KEK.hex() not in repr(w)
