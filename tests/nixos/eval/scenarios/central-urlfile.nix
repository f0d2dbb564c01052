# services.msp-central listening on every address with a database URL credential, firewall open
{ repo }: { modules = [ (repo + "/nixos/central.nix") ]; config = { services.msp-central = { enable = true; rootKeyFile = "/var/lib/msp-central-secrets/root.key"; database.urlFile = "/var/lib/msp-central-secrets/db-url"; openFirewall = true; settings = { host = "0.0.0.0"; port = 8443; }; }; }; }
