"""The GCS emulator takes anonymous requests. Beam finds that out only after Application Default
Credentials discovery fails four times with exponential back-off (about 30 s per process), so test
processes that talk to the emulator start anonymous, which is where Beam ends up anyway."""

import os


def start_anonymous_if_emulated() -> None:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from apache_beam.internal.gcp import auth

        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True
