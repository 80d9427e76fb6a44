"""What ``cryptography`` costs the agent's memory, and what the helper process costs in time.

Prints, for a fresh Python process that has already imported what the agent imports
(websockets, ocpp, the security package), its resident set (VmRSS) before and after the
security work runs in-process (a CSR, a chain check, certificate info: the first use
imports ``cryptography``), and the wall time of the same operations through
``HelperCrypto`` (one child process per operation). Run:

    python bench/bench_security_crypto.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import gc, sys
    def rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    import websockets.asyncio.client, ocpp.v16, agent.features.security.service
    gc.collect()
    before = rss_kib()
    assert "cryptography" not in sys.modules
    from agent.features.security import crypto
    key = crypto.generate_key("ec-p256")
    csr = crypto.make_csr(key, "CP-1", "CPO")
    after_csr = rss_kib()
    from cryptography import x509  # the same modules a chain check and firmware use
    import cryptography.hazmat.primitives.asymmetric.rsa, cryptography.x509.verification
    gc.collect()
    after_all = rss_kib()
    print(before, after_csr, after_all)
    """
)


def main() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    before, after_csr, after_all = (int(x) for x in out)
    print(f"agent-like process before cryptography: {before / 1024:6.1f} MiB RSS")
    print(
        f"after a CSR in-process:                 {after_csr / 1024:6.1f} MiB"
        f" (+{(after_csr - before) / 1024:.1f})"
    )
    print(
        f"after every module the checks use:      {after_all / 1024:6.1f} MiB"
        f" (+{(after_all - before) / 1024:.1f})"
    )
    sys.path.insert(0, str(ROOT))
    from agent.features.security.crypto import HelperCrypto

    helper = HelperCrypto()
    runs = 5
    start = time.perf_counter()
    for _ in range(runs):
        helper.run("generate_key", algorithm="ec-p256")
    per_call = (time.perf_counter() - start) / runs
    print(f"HelperCrypto, one operation (child process): {per_call * 1000:.0f} ms; agent +0 MiB")


if __name__ == "__main__":
    main()
