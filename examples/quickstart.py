"""Call a running Valv: create a key at central, wrap and unwrap a DEK at the sidecar.

    .venv/bin/python examples/quickstart.py                      # ./run.sh's addresses
    .venv/bin/python examples/quickstart.py --sidecar unix:valv-data/sidecar.sock

Uses grpclib and the generated stubs that ship with Valv, so it needs nothing
else installed; Google's `google-cloud-kms` client works the same way (see
the README's quick start).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from valv._proto.google.cloud.kms import v1 as kms


def channel(address: str) -> Channel:
    if address.startswith("unix:"):
        return Channel(path=address.removeprefix("unix:"))
    host, port = address.rsplit(":", 1)
    return Channel(host, int(port))


async def main(central_address: str, sidecar_address: str) -> None:
    central, sidecar = channel(central_address), channel(sidecar_address)
    try:
        admin = kms.KeyManagementServiceStub(central)
        parent = "projects/demo/locations/global"
        ring = f"{parent}/keyRings/quickstart"
        try:
            await admin.create_key_ring(kms.CreateKeyRingRequest(
                parent=parent, key_ring_id="quickstart"))
            await admin.create_crypto_key(kms.CreateCryptoKeyRequest(
                parent=ring, crypto_key_id="orders",
                crypto_key=kms.CryptoKey(purpose=kms.CryptoKeyCryptoKeyPurpose.ENCRYPT_DECRYPT)))
        except GRPCError as exc:  # a second run finds them there
            if exc.status.name != "ALREADY_EXISTS":
                raise
        key = f"{ring}/cryptoKeys/orders"
        local = kms.KeyManagementServiceStub(sidecar)
        dek = os.urandom(32)
        wrapped = await local.encrypt(kms.EncryptRequest(name=key, plaintext=dek))
        print(f"sidecar wrapped a 32-byte DEK with {wrapped.name}: "
              f"{len(wrapped.ciphertext)} bytes")
        unwrapped = await admin.decrypt(kms.DecryptRequest(name=key,
                                                           ciphertext=wrapped.ciphertext))
        assert unwrapped.plaintext == dek
        print("central unwrapped it: same DEK")
    finally:
        central.close()
        sidecar.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--central", default="127.0.0.1:50051")
    parser.add_argument("--sidecar", default="127.0.0.1:50052",
                        help="HOST:PORT or unix:PATH")
    args = parser.parse_args()
    asyncio.run(main(args.central, args.sidecar))
