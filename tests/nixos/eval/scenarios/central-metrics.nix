# services.msp-central with /metrics behind a bearer token passed as a credential
{ repo }: { modules = [ (repo + "/nixos/central.nix") ]; config = { services.msp-central = { enable = true; rootKeyFile = "/var/lib/msp-central-secrets/root.key"; metricsTokenFile = "/var/lib/msp-central-secrets/metrics-token"; settings.log_format = "json"; }; }; }
