# Key delegation: without a token the agent says it needs one (the missing
# credential does not fail its unit); a made-up token and a spent token are
# refused; enrollment
# through the token credential yields a certificate for a key generated on
# the appliance, which `msp-agent status --json` shows and the server lists;
# revoking that certificate (`msp-central keys revoke`) makes the agent stop
# signing while it keeps running.
{ self }:
let
  common = import ./common.nix { inherit self; };
in
{
  name = "msp-key-delegation";

  nodes = {
    central = common.nodes.central { database = "sqlite"; };
    appliance = common.nodes.appliance;
  };

  testScript =
    { nodes, ... }:
    ''
      ${common.prelude nodes}

      start_all()
      partner_key, site_id = setup_central()

      with subtest("without a token file the agent starts and says it needs one"):
          # The credential's placeholder stands in for the missing file: the
          # unit starts, and the agent, which cannot enroll without a token,
          # stays active and says so instead of failing the unit.
          appliance.succeed(f"rm -f {TOKEN_FILE}")
          appliance.succeed("systemctl start msp-agent.service")
          appliance.wait_until_succeeds(
              "journalctl --no-pager -u msp-agent.service | grep 'this appliance is not enrolled'"
          )
          appliance.succeed("systemctl is-active msp-agent.service")
          appliance.succeed(
              "systemctl show -p StatusText msp-agent.service | grep 'waiting for the operator'"
          )
          appliance.fail(
              "journalctl --no-pager -u msp-agent.service | grep -i 'credential'"
          )
          appliance.succeed("systemctl stop msp-agent.service")

      with subtest("an appliance without a valid token is refused"):
          write_token("made-up-token-0123456789abcdef0123")
          # READY=1 (STATUS=enrolling) comes before the request, so the
          # start succeeds; after the refusal the agent waits, active, for
          # a new token rather than presenting this one again.
          appliance.succeed("systemctl start msp-agent.service")
          appliance.wait_until_succeeds(
              "journalctl --no-pager -u msp-agent.service | grep 'enrollment refused'"
          )
          appliance.succeed("systemctl is-active msp-agent.service")
          appliance.succeed("systemctl stop msp-agent.service")
          t.assertEqual(partner_api(partner_key, f"sites/{site_id}/appliances")["items"], [])
          # The appliance API takes no unsigned request.
          status = central.succeed(
              "curl --silent --output /dev/null --write-out '%{http_code}' -X POST "
              f"http://localhost:{CENTRAL_PORT}/api/v1/appliances/nobody/heartbeat"
          )
          t.assertEqual(status.strip(), "401")

      with subtest("enrollment through the credential yields a certificate"):
          status = enroll(site_id)
          serial = status["certificate"]["serial"]
          t.assertFalse(status["certificate"]["revoked"])
          appliance.succeed("test -f /var/lib/msp/keys/certificate.json")
          appliance.succeed("test \"$(stat -c %a /var/lib/msp/keys)\" = 700")
          appliances = partner_api(partner_key, f"sites/{site_id}/appliances")["items"]
          t.assertEqual([a["certificate_serial"] for a in appliances], [serial])
          t.assertEqual(appliances[0]["id"], status["appliance_id"])

      with subtest("a spent token is refused"):
          token = appliance.succeed(f"cat {TOKEN_FILE}")
          output = appliance.fail(
              "msp-agent --state-dir /tmp/second-appliance enroll "
              f"--token {shlex.quote(token.strip())} 2>&1"
          )
          t.assertIn("enrollment refused", output)

      with subtest("revocation: the agent stops signing and keeps running"):
          wait_agent(".witnessed_size == .log_size")
          revoked = manage(f"keys revoke {serial} --reason 'VM test'")
          t.assertIn(serial, revoked["revoked_serials"])
          status = wait_agent('.link == "revoked" and .certificate.revoked', timeout=120)
          size = status["log_size"]
          appliance.sleep(3 * CHECK_INTERVAL)
          t.assertEqual(agent_status()["log_size"], size, "no entry is signed after revocation")
          appliance.succeed("systemctl is-active msp-agent.service")
          appliances = partner_api(partner_key, f"sites/{site_id}/appliances")["items"]
          t.assertLessEqual(appliances[0]["witnessed_size"], revoked["cutoff_size"])
    '';
}
