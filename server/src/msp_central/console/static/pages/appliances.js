// The Appliances page: each appliance's state (status, last contact,
// certificate, audit log, queues, failing checks), a site's enrollment
// tokens (created, shown once, revoked) and decommissioning behind a
// confirmation. Deep link: ?site=<id>[&decommissioned=true].

import {
  api, h, replace, run, showError, notice, time, ago, badge, table, paged, query,
  params, setParams, dialog, copy, can, me,
} from "../console.js";
import { sitePicker, siteLabel, siteName } from "./appliances-sites.js";

const LIMIT = 25;
const TOKEN_LIMIT = 10;
// Days before its end a certificate counts as expiring: the server's
// summary answers the threshold it counts with, read before any row is drawn,
// so the list flags exactly the certificates the summary counts.
let soonDays;
const DAY = 86400 * 1000;
const READ_ONLY = `Your role (${me.role}) can only read: creating and revoking tokens and decommissioning appliances need the editor role.`;

const STATUS_LABELS = {
  online: "Online", offline: "Offline", "never-seen": "Never seen",
  revoked: "Revoked", decommissioned: "Decommissioned",
};

run(async (root) => {
  const state = {
    site: params().get("site") || "",
    decommissioned: params().get("decommissioned") === "true",
  };
  const content = h("div", { class: "stack-lg" });

  const picker = await sitePicker({
    selected: state.site,
    idPrefix: "appliances",
    onchange: (site) => {
      state.site = site;
      setParams({ site });
      show();
    },
  });
  const which = h("select", { id: "appliances-which" },
    h("option", { value: "" }, "In service"),
    h("option", { value: "true" }, "Decommissioned"));
  which.value = state.decommissioned ? "true" : "";
  which.addEventListener("change", () => {
    state.decommissioned = which.value === "true";
    setParams({ decommissioned: which.value });
    show();
  });

  replace(root,
    h("form", { class: "card filters", role: "search", "aria-label": "Choose appliances", onsubmit: (e) => e.preventDefault() },
      h("div", { class: "filter-row" }, picker.element,
        h("div", { class: "stack" }, h("label", { for: which.id }, "Show"), which))),
    can("edit") ? null : h("p", { class: "hint read-only" }, READ_ONLY),
    content);

  async function show() {
    const stats = h("ul", { class: "stats", "aria-label": "Summary of the appliances listed" });
    const counted = h("p", { class: "hint" });
    const listTitle = state.site ? "Appliances of the site" : "Appliances of all sites";

    // The server counts every appliance the list holds, not the pages
    // loaded so far; it also says how soon a certificate counts as expiring.
    function summarise(summary) {
      soonDays = summary.expiring_within_days;
      const figures = state.decommissioned
        ? [["Decommissioned", summary.decommissioned]]
        : [["Online", summary.online], ["Offline", summary.offline], ["Never seen", summary.never_seen],
          ["Certificate expiring", summary.certificate_expiring], ["With failing checks", summary.with_failing_checks]];
      if (!state.decommissioned && summary.revoked) figures.splice(3, 0, ["Revoked", summary.revoked]);
      replace(stats, figures.map(([label, value]) =>
        h("li", { class: `stat-${label.toLowerCase().replace(/[^a-z]+/g, "-")}` },
          h("span", { class: "value" }, value.toLocaleString()), label)));
      counted.textContent = `${summary.total.toLocaleString()} appliance${summary.total === 1 ? "" : "s"} in all.`;
    }

    const columns = [
      { label: "Appliance", cell: (a) => applianceCell(a, !state.site) },
      { label: "Status", cell: statusCell },
      { label: "Certificate", cell: certificateCell },
      { label: "Audit log", cell: logCell, class: "num" },
      { label: "Queues", cell: queueCell },
      { label: "Failing checks", cell: failingCell },
    ];
    if (!state.decommissioned) columns.push({ label: "Actions", cell: (a) => actionCell(a, list) });
    const wrap = table({
      caption: state.decommissioned ? `${listTitle}, decommissioned` : listTitle,
      columns,
      empty: state.decommissioned ? "No decommissioned appliances." : "No appliances yet: create an enrollment token to add one.",
    });
    const list = paged(wrap, async (cursor) => {
      const filters = { limit: LIMIT, cursor, decommissioned: state.decommissioned ? "true" : null };
      const listed = state.site
        ? api(`/api/v1/sites/${encodeURIComponent(state.site)}/appliances${query(filters)}`)
        : api(`/api/v1/appliances${query(filters)}`);
      if (cursor) return listed;
      // The first page, and again on every reload (after a decommissioning):
      // the counts with it, read before its rows are drawn.
      const [page, summary] = await Promise.all([listed,
        api(`/api/v1/appliances/summary${query({ site_id: state.site, decommissioned: filters.decommissioned })}`)]);
      summarise(summary);
      return page;
    });
    const heading = h("h2", { id: "appliances-heading" }, "Appliances");
    if (state.site) siteName(state.site).then((name) => { if (name) heading.textContent = `Appliances of ${name}`; });
    const messages = h("div", { class: "messages" });
    list.messages = messages;
    const section = h("section", { class: "card", "aria-labelledby": heading.id }, heading, messages, stats, counted, list);
    const tokens = state.site ? tokenSection(state.site, () => list.reload()) : h("section", { class: "card", "aria-labelledby": "tokens-heading" },
      h("h2", { id: "tokens-heading" }, "Enrollment tokens"),
      h("p", { class: "hint" }, "Choose a site above to see its enrollment tokens and create one for a new appliance."));
    replace(content, section, tokens.element || tokens);
    await Promise.all([list.ready, tokens.ready]);
  }

  await show();
});

function applianceCell(appliance, withSite) {
  const version = appliance.heartbeat?.version;
  return h("div", { class: "appliance" },
    h("code", {}, appliance.id),
    withSite ? h("span", { class: "sub" }, "Site: ", siteLabel(appliance.site_id)) : null,
    h("span", { class: "sub muted" }, "Enrolled ", time(appliance.created_at)),
    typeof version === "string" ? h("span", { class: "sub muted" }, `Agent ${version}`) : null);
}

function statusCell(appliance) {
  return h("div", { class: "stack-tight" },
    badge(appliance.status, STATUS_LABELS[appliance.status]),
    h("span", { class: "sub" }, "Last contact: ",
      appliance.last_seen_at ? h("span", { title: appliance.last_seen_at }, ago(appliance.last_seen_at)) : h("span", { class: "muted" }, "never")),
    appliance.last_sync_at ? h("span", { class: "sub muted" }, "Log synced ", ago(appliance.last_sync_at)) : null);
}

function certificateCell(appliance) {
  if (!appliance.certificate_not_after) return h("span", { class: "muted" }, "No certificate");
  const left = new Date(appliance.certificate_not_after).getTime() - Date.now();
  let note = null;
  if (appliance.status === "decommissioned" || appliance.status === "revoked") {
    note = h("span", { class: "sub muted" }, "Revoked");
  } else if (left <= 0) {
    note = h("span", { class: "flag flag-bad" }, h("span", { "aria-hidden": "true" }, "✗ "), "Expired");
  } else if (left < soonDays * DAY) {
    note = h("span", { class: "flag flag-warn" }, h("span", { "aria-hidden": "true" }, "⧗ "), `Expires in ${Math.ceil(left / DAY)} days`);
  }
  return h("div", { class: "stack-tight" },
    h("span", {}, "Expires ", time(appliance.certificate_not_after)),
    note,
    appliance.certificate_serial ? h("span", { class: "sub muted" }, "Serial ", h("code", {}, appliance.certificate_serial)) : null);
}

function logCell(appliance) {
  const reported = appliance.log_size;
  const witnessed = appliance.witnessed_size;
  const behind = reported === null ? 0 : reported - witnessed;
  return h("div", { class: "stack-tight" },
    h("span", {}, h("strong", {}, reported === null ? "—" : reported.toLocaleString()), " entries"),
    h("span", { class: "sub" }, `${witnessed.toLocaleString()} witnessed`),
    behind > 0 ? h("span", { class: "flag flag-warn" }, `${behind.toLocaleString()} not witnessed yet`) : null,
    appliance.flagged_checkpoints
      ? h("span", { class: "flag flag-bad" }, `${appliance.flagged_checkpoints} checkpoint${appliance.flagged_checkpoints === 1 ? "" : "s"} signed after expiry`)
      : null);
}

function queueCell(appliance) {
  const queues = appliance.heartbeat?.queues;
  if (!queues || typeof queues !== "object") return h("span", { class: "muted" }, "No heartbeat yet");
  const entries = Object.entries(queues);
  if (!entries.length || entries.every(([, n]) => !n)) return h("span", { class: "muted" }, "Empty");
  return h("ul", { class: "queues" }, entries.map(([name, depth]) =>
    h("li", { class: depth ? "pending" : "muted" }, `${name}: `, h("strong", {}, String(depth)))));
}

function failingCell(appliance) {
  if (!appliance.failing_checks.length) {
    return h("span", { class: "muted" }, h("span", { "aria-hidden": "true" }, "✓ "), "None");
  }
  return h("ul", { class: "failing" }, appliance.failing_checks.map((check) =>
    h("li", {}, h("span", { "aria-hidden": "true" }, "✗ "), h("code", {}, check))));
}

function actionCell(appliance, list) {
  if (appliance.status === "decommissioned") return h("span", { class: "muted" }, "—");
  return h("button", {
    type: "button", class: "danger small",
    disabled: !can("edit"),
    title: can("edit") ? null : READ_ONLY,
    "aria-label": `Decommission ${appliance.id}`,
    onclick: () => confirmDecommission(appliance, list),
  }, "Decommission");
}

function confirmDecommission(appliance, list) {
  const reason = h("textarea", { id: "decommission-reason", maxLength: 256, rows: 3 });
  const confirm = h("button", { type: "submit", class: "danger" }, "Decommission appliance");
  const form = h("form", { class: "stack" },
    h("p", {}, "Decommissioning ", h("code", {}, appliance.id), " of ", siteLabel(appliance.site_id), ":"),
    h("ul", {},
      h("li", {}, "revokes every certificate it holds: it can no longer report in, sync its audit log or sign evidence;"),
      h("li", {}, "keeps its evidence, witnessed audit log and escalations, which stay verifiable;"),
      h("li", {}, "cannot be undone: to use the machine again, enroll it anew with a new token.")),
    h("label", { for: reason.id }, "Reason (optional, recorded in the central log)"),
    reason,
    h("div", { class: "row actions" }, confirm,
      h("button", { type: "button", onclick: () => box.close() }, "Cancel")));
  const box = dialog({ title: "Decommission this appliance?", content: form });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    confirm.disabled = true;
    try {
      const done = await api(
        `/api/v1/sites/${encodeURIComponent(appliance.site_id)}/appliances/${encodeURIComponent(appliance.id)}/decommission`,
        { method: "POST", body: { reason: reason.value.trim() } });
      box.close();
      await list.reload();
      notice(list.messages, `Appliance ${done.id} was decommissioned; ${done.revoked_serials.length} certificate${done.revoked_serials.length === 1 ? "" : "s"} revoked.`);
    } catch (error) {
      showError(form, error);
    } finally {
      confirm.disabled = false;
    }
  });
  reason.focus();
}

// --- enrollment tokens ---------------------------------------------------------------

const TOKEN_STATES = {
  active: ["●", "Active"], used: ["✓", "Used"], expired: ["⧗", "Expired"], revoked: ["✗", "Revoked"],
};

function tokenState(state) {
  const [symbol, word] = TOKEN_STATES[state] || ["•", state];
  return h("span", { class: `badge token-${state}` }, h("span", { "aria-hidden": "true" }, symbol), " ", word);
}

/** The command that enrolls an appliance with `token` (the agent reads it
 * from stdin, so it stays out of the process list). */
function enrollCommand(token) {
  return `printf '%s\\n' '${token}' | sudo -u msp msp-agent enroll --server ${location.origin} --token-file -`;
}

function tokenSection(siteId, onEnrolled) {
  const heading = h("h2", { id: "tokens-heading" }, "Enrollment tokens");
  const hours = h("select", { id: "token-hours" },
    h("option", { value: "1" }, "1 hour"),
    h("option", { value: "24", selected: true }, "24 hours"),
    h("option", { value: "72" }, "3 days"),
    h("option", { value: "168" }, "7 days"),
    h("option", { value: "720" }, "30 days"));
  const create = h("button", { type: "submit", class: "primary", disabled: !can("edit"), title: can("edit") ? null : READ_ONLY }, "Create enrollment token");
  const shown = h("div", { class: "token-once-slot" });
  const section = h("section", { class: "card", "aria-labelledby": heading.id });
  const messages = h("div", { class: "messages" });

  const wrap = table({
    caption: "Tokens of this site, newest first",
    columns: [
      { label: "Token", cell: (t) => h("code", {}, t.id) },
      { label: "State", cell: (t) => tokenState(t.state) },
      { label: "Created", cell: (t) => h("div", { class: "stack-tight" }, time(t.created_at), t.created_by ? h("span", { class: "sub muted" }, `by ${t.created_by}`) : null) },
      { label: "Expires", cell: (t) => time(t.expires_at) },
      { label: "Used by", cell: (t) => t.appliance_id ? h("div", { class: "stack-tight" }, h("code", {}, t.appliance_id), h("span", { class: "sub muted" }, time(t.used_at))) : h("span", { class: "muted" }, "—") },
      { label: "Actions", cell: (t) => revokeButton(t) },
    ],
    empty: "No enrollment tokens for this site yet.",
  });
  const list = paged(wrap, (cursor) =>
    api(`/api/v1/sites/${encodeURIComponent(siteId)}/enrollment-tokens${query({ limit: TOKEN_LIMIT, cursor })}`));

  function revokeButton(token) {
    if (token.state !== "active") return h("span", { class: "muted" }, "—");
    const button = h("button", {
      type: "button", class: "danger small", disabled: !can("edit"),
      title: can("edit") ? null : READ_ONLY, "aria-label": `Revoke token ${token.id}`,
    }, "Revoke");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/api/v1/sites/${encodeURIComponent(siteId)}/enrollment-tokens/${encodeURIComponent(token.id)}`, { method: "DELETE" });
        await list.reload();
        notice(messages, `Token ${token.id} was revoked: no appliance can enroll with it.`);
      } catch (error) {
        showError(messages, error);
        await list.reload();
        onEnrolled();
      }
    });
    return button;
  }

  const form = h("form", { class: "row token-form" },
    h("div", { class: "stack" }, h("label", { for: hours.id }, "Valid for"), hours),
    create);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    create.disabled = true;
    try {
      const made = await api(`/api/v1/sites/${encodeURIComponent(siteId)}/enrollment-tokens`,
        { method: "POST", body: { hours: Number(hours.value) } });
      replace(shown, tokenOnce(made));
      await list.reload();
      shown.querySelector("h3")?.focus();
    } catch (error) {
      showError(messages, error);
    } finally {
      create.disabled = !can("edit");
    }
  });

  replace(section, heading, messages,
    h("p", { class: "hint" }, "A token lets one appliance enroll in this site. It works once, until it expires; revoke it if it is no longer needed."),
    form, shown, list);
  return { element: section, ready: list.ready };
}

function tokenOnce(made) {
  const command = enrollCommand(made.token);
  const copyToken = h("button", { type: "button", onclick: () => copy(made.token, copyToken) }, "Copy token");
  const copyCommand = h("button", { type: "button", onclick: () => copy(command, copyCommand) }, "Copy command");
  return h("div", { class: "token-once", role: "group", "aria-labelledby": "token-once-heading" },
    h("h3", { id: "token-once-heading", tabindex: "-1" }, "New enrollment token"),
    h("p", { class: "warning" }, h("strong", {}, "Shown once. "),
      "Copy it now: the server keeps only its hash and cannot show it again. It expires ", time(made.expires_at), "."),
    h("p", { class: "label" }, "Token"),
    h("div", { class: "copy-row" }, h("code", { class: "secret", id: "token-value" }, made.token), copyToken),
    h("p", { class: "label" }, "Run on the appliance"),
    h("div", { class: "copy-row" }, h("pre", { class: "command", id: "token-command" }, h("code", {}, command)), copyCommand),
    h("p", { class: "hint" }, "The agent reads the token from standard input, so it never shows in the process list. ",
      "Once enrolled, the appliance appears in the list above."));
}
