"""One package per OCPP 1.6 feature profile, named as ``SupportedFeatureProfiles`` names them.

Each holds its service (the feature's logic, reaching the charge point only through
:class:`agent.chargepoint.port.ChargePointPort`), its configuration-key specs (``keys.py``)
and, where it has any, its tables. Pure rules live in ``agent.core``; the OCPP handlers in
``agent.ocpp.handlers``. :mod:`agent.features.registry` assembles the key registry.
"""
