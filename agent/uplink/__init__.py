"""Uplink failover (WiFi / GSM / Ethernet): see :mod:`agent.uplink.supervisor`. The
supervisor runs in its own process (:mod:`agent.uplink.child`, ``python -m agent.uplink
--child``); the agent talks to it through :mod:`agent.uplink.client`."""
