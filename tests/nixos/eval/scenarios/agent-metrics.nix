# services.msp-agent writing its Prometheus textfile for node_exporter
{ repo }: { modules = [ (repo + "/nixos/agent.nix") ]; config = { services.msp-agent = { enable = true; centralUrl = "https://central.example.com"; centralPublicKey = "77ff85ad0e906477d6122b93d31400dd7bb04cd3e576b4d6161699bdc2955dda"; metrics.textfileDirectory = "/var/lib/msp-metrics"; }; }; }
