"""msp_agent: the MSP compliance appliance agent.

Modules:

- :mod:`~msp_agent.store` — one SQLite file, one connection, one thread
- :mod:`~msp_agent.keys` — DelegatedSigningKey: device key, certificate, renewal, rotation
- :mod:`~msp_agent.audit` — OfflineAuditTrail: the Merkle audit log
"""

__version__ = "0.1.0"
