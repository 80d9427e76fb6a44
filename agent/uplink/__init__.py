"""Uplink failover (WiFi / GSM / Ethernet): see :mod:`agent.uplink.supervisor`."""
