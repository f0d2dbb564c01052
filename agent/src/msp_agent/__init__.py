"""msp_agent: the MSP compliance appliance agent.

Modules:

- :mod:`~msp_agent.store` — one SQLite file, one connection, one thread
- :mod:`~msp_agent.keys` — DelegatedSigningKey: device key, certificate, renewal, rotation
- :mod:`~msp_agent.audit` — OfflineAuditTrail: the Merkle audit log and its sync
- :mod:`~msp_agent.evidence` — EvidenceQueue: signed bundles awaiting the server
- :mod:`~msp_agent.urgent` — UrgentCloudRetry: critical incidents, retried with backoff
- :mod:`~msp_agent.sms` — SMSAlerter: the SMS fallback through Twilio
- :mod:`~msp_agent.caches` — signed runbook, framework and site-configuration bundles
- :mod:`~msp_agent.manager` — LocalResilienceManager: the façade over all of them
- :mod:`~msp_agent.central` — the interface every component uses to reach the server
- :mod:`~msp_agent.retry` — exponential backoff with full jitter after the cap
"""

__version__ = "0.1.0"
