"""The Valv sidecar: a local, Cloud KMS compatible endpoint next to an application.

This first piece forwards every call to central (valv.sidecar.forward);
local Encrypt/Decrypt from a cache of key material comes next (docs/sidecar.md).
"""
