# What the VM tests share: a `central` node and an `appliance` node, and
# Python helpers for the test scripts. Each test file imports this and adds
# its scenario (the same three scenarios tests/system runs with processes).
{ self }:
let
  # A root key for these tests only. Its seed is public (it is right here),
  # so nothing outside a test VM may ever trust it. The public key was
  # derived from the seed with msp_protocol.keys.SigningKey; the tests check
  # the pair with `msp-central-manage keys show`.
  testRootSeed = "8bdbfcd77f9d1f284e39d645319a8c35946ffc9c5636af8e5e487c487a71e588";
  testRootPublicKey = "77ff85ad0e906477d6122b93d31400dd7bb04cd3e576b4d6161699bdc2955dda";
  rootKeyFile = "/var/lib/msp-central-secrets/root.key";
in
{
  nodes = {
    central =
      { database }:
      { pkgs, ... }:
      {
        imports = [ self.nixosModules.central ];
        services.msp-central = {
          enable = true;
          inherit rootKeyFile;
          openFirewall = true;
          database.createLocally = database == "postgresql";
          settings = {
            host = "0.0.0.0";
            port = 8080;
            public_url = "http://central:8080";
          };
        };
        # The credential source: root's alone, as in production. It is made
        # at boot from the seed above; a store path is not an externalPath.
        systemd.tmpfiles.settings."10-msp-test-root-key" = {
          "/var/lib/msp-central-secrets".d = {
            mode = "0700";
            user = "root";
            group = "root";
          };
          ${rootKeyFile}.f = {
            mode = "0400";
            user = "root";
            group = "root";
            argument = testRootSeed;
          };
        };
        environment.systemPackages = [
          pkgs.curl
          pkgs.jq
        ];
      };

    appliance =
      {
        nodes,
        lib,
        pkgs,
        ...
      }:
      {
        imports = [ self.nixosModules.appliance ];
        services.msp-agent = {
          centralUrl = "http://central:${toString nodes.central.services.msp-central.settings.port}";
          centralPublicKey = testRootPublicKey;
          # Minutes become seconds so a scenario fits in a test run.
          settings = {
            check_interval_seconds = 15;
            sync_interval_seconds = 5;
            heartbeat_interval_seconds = 10;
            bundle_refresh_seconds = 10;
            request_timeout_seconds = 5;
          };
        };
        # Each test enrolls the agent itself, once it has written a token.
        systemd.services.msp-agent.wantedBy = lib.mkForce [ ];
        # The offline test fills the disk on purpose: keep the journal, which
        # the tests read, in memory where a full disk cannot stop it.
        environment.etc."systemd/journald.conf.d/50-msp-appliance.conf".text = lib.mkForce ''
          [Journal]
          Storage=volatile
          RuntimeMaxUse=64M
        '';
        environment.systemPackages = [
          pkgs.curl
          pkgs.jq
          pkgs.sqlite
        ];
      };
  };

  # Python shared by the test scripts. `nodes` are the evaluated nodes; the
  # helpers read ports, paths and keys from them instead of repeating them.
  prelude =
    nodes:
    let
      central = nodes.central.services.msp-central;
      agent = nodes.appliance.services.msp-agent;
    in
    ''
      import json
      import shlex

      CENTRAL_PORT = ${toString central.settings.port}
      PINNED_KEY = "${agent.centralPublicKey}"
      TOKEN_FILE = "${agent.enrollmentTokenFile}"
      CHECK_INTERVAL = ${toString agent.settings.check_interval_seconds}


      def manage(command):
          """msp-central-manage on the central node; its JSON answer."""
          return json.loads(central.succeed(f"msp-central-manage {command}"))


      def api_command(key, path):
          return (
              f"curl --fail --silent --show-error -H {shlex.quote('Authorization: Bearer ' + key)} "
              f"http://localhost:{CENTRAL_PORT}/api/v1/{path}"
          )


      def partner_api(key, path):
          """GET a partner API resource on the central server."""
          return json.loads(central.succeed(api_command(key, path)))


      def partner_post(key, path, body):
          """POST a JSON body to the partner API."""
          return json.loads(
              central.succeed(
                  api_command(key, path)
                  + " -X POST -H 'Content-Type: application/json' --data "
                  + shlex.quote(json.dumps(body))
              )
          )


      def wait_partner_api(key, path, jq_filter, timeout=300):
          """Wait until the partner API resource satisfies a jq filter."""
          central.wait_until_succeeds(
              api_command(key, path) + f" | jq -e {shlex.quote(jq_filter)}", timeout=timeout
          )
          return partner_api(key, path)


      def agent_status():
          return json.loads(appliance.succeed("msp-agent status --json"))


      def wait_agent(jq_filter, timeout=300):
          """Wait until `msp-agent status --json` satisfies a jq filter."""
          appliance.wait_until_succeeds(
              f"msp-agent status --json | jq -e {shlex.quote(jq_filter)}", timeout=timeout
          )
          return agent_status()


      def write_token(token):
          """Put an enrollment token where the agent's credential comes from."""
          appliance.succeed(
              f"install -d -m 0700 $(dirname {TOKEN_FILE})",
              f"(umask 077 && printf %s {shlex.quote(token)} > {TOKEN_FILE})",
          )


      def setup_central():
          """A running central server, a partner (healthcare preset) and a
          site; checks that the appliance pins this server's key."""
          central.wait_for_unit("msp-central.service")
          central.wait_for_open_port(CENTRAL_PORT)
          key = manage("keys show")
          t.assertEqual(key["public_key"], PINNED_KEY, "the appliance pins the central key")
          partner = manage("partner create 'VM test MSP'")
          # Frameworks for the site, so its checks yield evidence bundles.
          partner_post(partner["api_key"], "partner/apply-preset", {"preset": "healthcare"})
          site = manage(f"site create --partner {partner['partner_id']} 'VM test clinic'")
          return partner["api_key"], site["site_id"]


      def enroll(site_id):
          """A fresh token, the agent started with it, enrolled and online."""
          token = manage(f"token create --site {site_id}")["token"]
          write_token(token)
          appliance.succeed("systemctl start msp-agent.service")
          return wait_agent('.link == "online" and .certificate.serial != null')
    '';
}
