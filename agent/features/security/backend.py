"""The security feature's crypto back-ends, without the operations themselves: the agent
imports only this (the operations, in :mod:`agent.features.security.crypto`, load on first
use in this process, or run in a child process). See that module's docstring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

SIGNATURE_VERIFIED = "SignatureVerified"
INVALID_CERTIFICATE = "InvalidCertificate"
INVALID_SIGNATURE = "InvalidSignature"


class CryptoInputError(ValueError):
    """A certificate, key, CSR or signature that cannot be parsed or does not fit."""


# ---------------------------------------------------------------------- back-ends
class Crypto(Protocol):
    """The operations above, run somewhere (this process or a helper)."""

    def run(self, op: str, **args: Any) -> Any: ...


class HelperCrypto:
    """Run each operation in a child Python process, so ``cryptography`` never enters the
    agent's memory. A call blocks for the child's run (about a quarter of a second on a
    small ARM board): call it from a worker thread (``asyncio.to_thread``)."""

    def __init__(self, python: str = sys.executable, timeout_s: float = 120.0) -> None:
        self.python = python
        self.timeout_s = timeout_s

    def run(self, op: str, **args: Any) -> Any:
        done = subprocess.run(
            [self.python, "-m", "agent.features.security.crypto"],
            input=json.dumps({"op": op, "args": args}),
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
            check=False,
            cwd=str(Path(__file__).resolve().parents[3]),
        )
        try:
            answer = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"crypto helper failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
            ) from None
        if "error" in answer:
            raise CryptoInputError(answer["error"])
        return answer["result"]
