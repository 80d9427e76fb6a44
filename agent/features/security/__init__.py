"""OCPP 1.6 security extensions: certificates, security profile 3, security events."""
