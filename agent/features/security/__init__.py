"""The OCPP 1.6 security extensions (security whitepaper): keys and, as they are built,
certificates, security events and signed firmware."""
