# metrics_access "bearer" without metricsTokenFile: the assertion must fire
{ repo }: { modules = [ (repo + "/nixos/central.nix") ]; config = { services.msp-central = { enable = true; rootKeyFile = "/var/lib/msp-central-secrets/root.key"; settings.metrics_access = "bearer"; }; };
  expectAssertions = [ "settings.metrics_access is \"bearer\" but no" ];
}
