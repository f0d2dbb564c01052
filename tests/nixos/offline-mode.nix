# Offline mode: the appliance loses its link while its checks run and a
# critical incident is raised; it keeps logging, signing and queueing, runs
# its L1 action through polkit, and when the link returns everything reaches
# the server exactly once. Also: the firewall lets nothing in, and polkit
# lets the agent's user start only the allow-listed L1 units.
{ self }:
let
  common = import ./common.nix { inherit self; };
in
{
  name = "msp-offline-mode";

  nodes = {
    central = common.nodes.central { database = "sqlite"; };
    appliance =
      { pkgs, ... }:
      {
        imports = [ common.nodes.appliance ];
        # Something listening on the appliance, to show the firewall drops
        # inbound connections rather than nothing being there.
        systemd.services.probe-listener.serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server 8000";
      };
  };

  testScript =
    { nodes, ... }:
    ''
      ${common.prelude nodes}

      start_all()
      partner_key, site_id = setup_central()

      with subtest("the appliance enrolls and reaches the server"):
          enroll(site_id)
          appliance.succeed(
              f"curl --fail --silent http://central:{CENTRAL_PORT}/api/v1/openapi.json > /dev/null"
          )

      with subtest("nothing reaches the appliance: egress only"):
          appliance.succeed("systemctl start probe-listener.service")
          appliance.wait_for_open_port(8000)
          central.fail("curl --silent --max-time 5 http://appliance:8000/")
          appliance.succeed("systemctl stop probe-listener.service")

      with subtest("online: checks ran and the server witnessed the whole log"):
          wait_agent(
              '.link == "online" and .last_check_at != null and .urgent_waiting == 0 '
              "and .evidence_queued == 0 and .witnessed_size == .log_size"
          )
          escalations_before = partner_api(partner_key, "escalations")["items"]

      with subtest("offline: the disk fills while the link is down"):
          appliance.block()
          # Leave 5 % free: below disk_min_free_percent (10 %), a critical check.
          appliance.succeed(
              "total=$(df --output=size -B1 /var/lib/msp | tail -n1); "
              "avail=$(df --output=avail -B1 /var/lib/msp | tail -n1); "
              "fallocate -l $((avail - total * 5 / 100)) /var/lib/msp-test-fill"
          )
          offline = wait_agent('.link != "online" and .urgent_waiting >= 1', timeout=600)
          t.assertGreater(
              offline["log_size"], offline["witnessed_size"], "the agent keeps logging offline"
          )
          t.assertEqual(
              partner_api(partner_key, "escalations")["items"], escalations_before, "nothing got through"
          )

      with subtest("the agent ran its L1 action as root, through polkit"):
          appliance.succeed(
              "journalctl --no-pager -u msp-l1@vacuum-journal.service | grep 'msp-l1: vacuum-journal'"
          )

      with subtest("back online: everything reaches the server, once"):
          appliance.unblock()
          wait_agent(
              '.link == "online" and .urgent_waiting == 0 and .evidence_queued == 0 '
              f'and .witnessed_size >= {offline["log_size"]}',
              timeout=600,
          )
          wait_partner_api(
              partner_key,
              "escalations",
              '[.items[] | select(.severity == "critical" and (.title | contains("state-disk-space")))]'
              " | length == 1",
          )
          appliances = partner_api(partner_key, f"sites/{site_id}/appliances")["items"]
          t.assertEqual(len(appliances), 1)
          t.assertGreaterEqual(appliances[0]["witnessed_size"], offline["log_size"])
          evidence = partner_api(partner_key, f"sites/{site_id}/evidence")["items"]
          t.assertTrue(evidence, "evidence bundles signed offline reached the server")
          t.assertEqual(
              partner_api(partner_key, "security-alerts")["items"], [], "an outage is not a security alert"
          )
          appliance.succeed("rm /var/lib/msp-test-fill")

      with subtest("polkit: the agent's user starts allow-listed L1 units, nothing else"):
          as_agent = "runuser -u msp -- /run/current-system/sw/bin/systemctl --no-ask-password"
          appliance.succeed(f"{as_agent} start msp-l1@restart-timesyncd.service")
          appliance.fail(f"{as_agent} start msp-l1@not-allowed.service")
          appliance.fail(f"{as_agent} restart msp-l1@restart-timesyncd.service")
          appliance.fail(f"{as_agent} stop systemd-timesyncd.service")
          appliance.fail(f"{as_agent} start probe-listener.service")
          # Even root cannot make the template run an action it does not know.
          appliance.fail("systemctl start msp-l1@not-allowed.service")

      with subtest("each L1 action does its job inside its sandbox"):
          for action in (
              "restart-timesyncd",
              "vacuum-journal",
              "restart-failed-units",
              "reload-firewall",
              "collect-nix-garbage",
          ):
              appliance.succeed(f"systemctl start msp-l1@{action}.service")
              t.assertEqual(
                  appliance.succeed(
                      f"systemctl show --property=Result --value msp-l1@{action}.service"
                  ).strip(),
                  "success",
                  action,
              )
          # No automatic upgrades on this appliance: the action says why it fails.
          appliance.fail("systemctl start msp-l1@start-nixos-upgrade.service")
          appliance.succeed(
              "journalctl --no-pager -u msp-l1@start-nixos-upgrade.service "
              "| grep 'system.autoUpgrade is off'"
          )
          appliance.succeed("systemctl reset-failed msp-l1@start-nixos-upgrade.service")
          appliance.succeed("systemctl is-active msp-agent.service")
    '';
}
