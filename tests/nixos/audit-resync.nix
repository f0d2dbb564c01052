# Audit resync, on a central server with a local PostgreSQL: the server goes
# away mid-way and comes back, and the appliance resyncs without a gap, a
# duplicate or an alert. Then a row of the appliance's audit log is changed
# behind the agent's back: the server refuses that history with a security
# alert, the agent reports it and keeps running.
{ self }:
let
  common = import ./common.nix { inherit self; };
in
{
  name = "msp-audit-resync";

  nodes = {
    central = common.nodes.central { database = "postgresql"; };
    appliance = common.nodes.appliance;
  };

  testScript =
    { nodes, ... }:
    ''
      ${common.prelude nodes}

      start_all()
      partner_key, site_id = setup_central()
      central.succeed("systemctl is-active postgresql.service")

      with subtest("enrolled and witnessed"):
          appliance_id = enroll(site_id)["appliance_id"]
          wait_agent(".witnessed_size == .log_size")

      with subtest("the server stops mid-way and comes back: the log resyncs"):
          central.succeed("systemctl stop msp-central.service")
          during = wait_agent('.link != "online" and .log_size > .witnessed_size', timeout=300)
          central.succeed("systemctl start msp-central.service")
          central.wait_for_open_port(CENTRAL_PORT)
          wait_agent(
              f'.link == "online" and .witnessed_size >= {during["log_size"]}', timeout=300
          )
          appliances = partner_api(partner_key, f"sites/{site_id}/appliances")["items"]
          t.assertGreaterEqual(appliances[0]["witnessed_size"], during["log_size"])
          t.assertEqual(partner_api(partner_key, "security-alerts")["items"], [])

      with subtest("a changed row the server has not seen yet is refused"):
          appliance.block()
          offline = wait_agent('.link != "online"', timeout=300)
          wait_agent(f'.log_size > {offline["witnessed_size"]}', timeout=300)
          appliance.succeed("systemctl stop msp-agent.service")
          # Change the newest entry's timestamp in place (19xx for 20xx). As
          # the agent's user: a root-owned -wal or -shm file would lock the
          # agent out of its own database.
          changed = appliance.succeed(
              "runuser -u msp -- /run/current-system/sw/bin/sqlite3 /var/lib/msp/audit.sqlite "
              + shlex.quote(
                  "UPDATE entries SET raw = CAST(replace(CAST(raw AS TEXT), "
                  "'\"ts\":\"20', '\"ts\":\"19') AS BLOB) "
                  "WHERE idx = (SELECT MAX(idx) FROM entries); SELECT changes();"
              )
          )
          t.assertEqual(changed.strip(), "1")
          appliance.unblock()
          appliance.succeed("systemctl start msp-agent.service")

          alerts = wait_partner_api(partner_key, "security-alerts", ".items | length > 0")["items"]
          t.assertTrue(all(alert["appliance_id"] == appliance_id for alert in alerts))
          # The agent names the refusal and tells a human, and keeps running.
          wait_agent('.problems["audit-sync"] != null')
          wait_partner_api(
              partner_key,
              "escalations",
              '[.items[] | select(.severity == "critical" and (.title | startswith("Audit log sync refused")))]'
              " | length >= 1",
          )
          output = appliance.fail("runuser -u msp -- /run/current-system/sw/bin/msp-agent audit verify 2>&1")
          t.assertIn("does NOT verify", output)
          appliance.succeed("systemctl is-active msp-agent.service")
    '';
}
