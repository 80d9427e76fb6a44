"""Local Auth List Management profile: SendLocalList, GetLocalListVersion (and the
authorization cache and offline rules the list takes part in)."""
