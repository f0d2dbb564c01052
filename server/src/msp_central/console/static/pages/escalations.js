// The Escalations and alerts page: appliances' urgent escalations (open
// ones first in mind: acknowledged with a note, in a dialog) and the
// security alerts ingest raised, both a page at a time. The filters are
// form controls mirrored in the URL (?status=&severity=&site=&since=&code=),
// so a filtered view can be shared as a link.

import {
  api, h, replace, run, showError, notice, time, ago, badge, table, paged, query,
  params, setParams, dialog, can, me,
} from "../console.js";
import { sitePicker, siteLabel } from "./appliances-sites.js";

const LIMIT = 25;
const READ_ONLY = `Your role (${me.role}) can only read: acknowledging escalations needs the editor role.`;
const SEVERITIES = ["critical", "high", "medium", "low"];
const SEVERITY = {
  critical: ["‼", "Critical"], high: ["!", "High"], medium: ["•", "Medium"], low: ["·", "Low"],
};
const STATUSES = { open: "Open", acknowledged: "Acknowledged", all: "All" };
const PERIODS = { "": "Any time", "24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days" };
const HOURS = { "24h": 24, "7d": 24 * 7, "30d": 24 * 30 };

/** The filters as the URL gives them, unknown values dropped. */
function readFilters() {
  const given = params();
  const pick = (name, allowed, fallback = "") => (allowed.includes(given.get(name)) ? given.get(name) : fallback);
  return {
    status: pick("status", Object.keys(STATUSES), "open"),
    severity: pick("severity", SEVERITIES),
    since: pick("since", Object.keys(PERIODS)),
    site: given.get("site") || "",
    code: (given.get("code") || "").slice(0, 64),
  };
}

/** The RFC 3339 start of a period ("" for any time), to the second. */
function periodStart(since) {
  if (!HOURS[since]) return null;
  return new Date(Date.now() - HOURS[since] * 3600 * 1000).toISOString().replace(/\.\d+Z$/, "Z");
}

function select(id, options, value) {
  const element = h("select", { id, name: id },
    Object.entries(options).map(([key, label]) => h("option", { value: key }, label)));
  element.value = value;
  return element;
}

run(async (root) => {
  const filters = readFilters();
  const content = h("div");
  const apply = () => {
    setParams({ ...filters, status: filters.status === "open" ? "" : filters.status });
    return show();
  };

  const status = select("filter-status", STATUSES, filters.status);
  const severity = select("filter-severity",
    { "": "Any severity", ...Object.fromEntries(SEVERITIES.map((s) => [s, SEVERITY[s][1]])) }, filters.severity);
  const since = select("filter-since", PERIODS, filters.since);
  const code = h("input", { type: "text", id: "filter-code", value: filters.code, maxLength: 64, autocomplete: "off",
    "aria-describedby": "filter-code-hint" });
  for (const [control, key] of [[status, "status"], [severity, "severity"], [since, "since"]]) {
    control.addEventListener("change", () => { filters[key] = control.value; apply(); });
  }
  const picker = await sitePicker({
    selected: filters.site, idPrefix: "filter", onchange: (site) => { filters.site = site; apply(); },
  });

  const form = h("form", { class: "card filters", role: "search", "aria-label": "Filter escalations and alerts" },
    h("div", { class: "filter-row" },
      picker.element,
      h("div", { class: "stack" }, h("label", { for: since.id }, "Period"), since)),
    h("div", { class: "filter-row" },
      h("div", { class: "stack" }, h("label", { for: status.id }, "Escalation status"), status),
      h("div", { class: "stack" }, h("label", { for: severity.id }, "Severity"), severity),
      h("div", { class: "stack" }, h("label", { for: code.id }, "Alert code"), code,
        h("span", { class: "hint", id: "filter-code-hint" }, "For example unknown-key")),
      h("div", { class: "stack apply" }, h("button", { type: "submit" }, "Apply filters"))));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    filters.code = code.value.trim();
    apply();
  });

  replace(root, form, can("edit") ? null : h("p", { class: "hint read-only" }, READ_ONLY), content);

  async function show() {
    const from = periodStart(filters.since);
    const escalations = escalationSection(filters, from);
    const alerts = alertSection(filters, from);
    replace(content, escalations.element, alerts.element);
    await Promise.all([escalations.ready, alerts.ready]);
  }
  await show();
});

// --- escalations -----------------------------------------------------------------------

function severityBadge(severity) {
  const [symbol, word] = SEVERITY[severity] || ["•", severity];
  return h("span", { class: `badge severity-${severity}` }, h("span", { "aria-hidden": "true" }, symbol), " ", word);
}

function detailList(detail) {
  const entries = Object.entries(detail || {});
  if (!entries.length) return null;
  return h("dl", { class: "detail" }, entries.slice(0, 8).map(([key, value]) => [
    h("dt", {}, key),
    h("dd", {}, typeof value === "string" ? value : JSON.stringify(value)),
  ]));
}

function escalationSection(filters, from) {
  const heading = h("h2", { id: "escalations-heading" },
    filters.status === "open" ? "Open escalations" : filters.status === "acknowledged" ? "Acknowledged escalations" : "Escalations");
  const messages = h("div", { class: "messages" });
  const wrap = table({
    caption: `${heading.textContent}, newest first`,
    columns: [
      { label: "Escalation", cell: (e) => h("div", { class: "stack-tight" }, h("strong", {}, e.title), detailList(e.detail)) },
      { label: "Severity", cell: (e) => severityBadge(e.severity) },
      { label: "Site and appliance", cell: (e) => h("div", { class: "stack-tight" }, siteLabel(e.site_id), h("code", { class: "sub" }, e.appliance_id)) },
      { label: "Received", cell: (e) => h("div", { class: "stack-tight" }, time(e.received_at), h("span", { class: "sub muted" }, ago(e.received_at))) },
      { label: "Status", cell: statusCell },
      { label: "Actions", cell: (e) => actionCell(e) },
    ],
    empty: filters.status === "open" ? "No open escalations: nothing is waiting for you." : "No escalations match these filters.",
  });
  const list = paged(wrap, (cursor) => api(`/api/v1/escalations${query({
    limit: LIMIT, cursor,
    open: filters.status === "open" ? "true" : filters.status === "acknowledged" ? "false" : null,
    severity: filters.severity, site_id: filters.site, from,
  })}`));

  function actionCell(escalation) {
    if (escalation.acknowledged_at) return h("span", { class: "muted" }, "—");
    return h("button", {
      type: "button", class: "primary small", disabled: !can("edit"), title: can("edit") ? null : READ_ONLY,
      "aria-label": `Acknowledge “${escalation.title}” (${escalation.id})`,
      onclick: () => acknowledge(escalation, list, messages),
    }, "Acknowledge");
  }

  const element = h("section", { class: "card", "aria-labelledby": heading.id }, heading, messages, list);
  return { element, ready: list.ready };
}

function statusCell(escalation) {
  if (!escalation.acknowledged_at) return badge("open");
  return h("div", { class: "stack-tight" },
    badge("acknowledged"),
    h("span", { class: "sub" }, time(escalation.acknowledged_at)),
    escalation.acknowledged_by ? h("span", { class: "sub muted" }, "by ", actorLabel(escalation.acknowledged_by)) : null,
    escalation.acknowledged_note ? h("blockquote", { class: "note" }, escalation.acknowledged_note) : null);
}

let users = null;

/** The partner's console users by id, read once and only when an
 * acknowledgement names one (a partner has few users). */
function usersById() {
  users ??= api("/api/v1/users?limit=500")
    .then((page) => new Map(page.items.map((user) => [user.id, user.email])))
    .catch(() => new Map());
  return users;
}

/** Who acted, as a person reads it: a console user's e-mail address, or
 * the API key (its prefix) that acted. */
function actorLabel(actor) {
  const user = /\/user:(.+)$/.exec(actor);
  if (user) {
    const span = h("span", {}, "a console user");
    usersById().then((known) => { if (known.has(user[1])) span.textContent = known.get(user[1]); });
    return span;
  }
  const key = /\/key:(.+)$/.exec(actor);
  return key ? h("span", {}, "API key ", h("code", {}, key[1])) : h("span", {}, actor);
}

function acknowledge(escalation, list, messages) {
  const note = h("textarea", { id: "acknowledge-note", maxLength: 2000, rows: 4 });
  const submit = h("button", { type: "submit", class: "primary" }, "Acknowledge");
  const form = h("form", { class: "stack" },
    h("dl", { class: "facts" },
      h("dt", {}, "Escalation"), h("dd", {}, escalation.title),
      h("dt", {}, "Severity"), h("dd", {}, severityBadge(escalation.severity)),
      h("dt", {}, "Site"), h("dd", {}, siteLabel(escalation.site_id)),
      h("dt", {}, "Appliance"), h("dd", {}, h("code", {}, escalation.appliance_id)),
      h("dt", {}, "Received"), h("dd", {}, time(escalation.received_at))),
    h("p", { class: "hint" }, "Acknowledging says someone is on it: the escalation leaves the open list, and who acknowledged it, when and with what note is recorded in the central log. The first acknowledgement stands."),
    h("label", { for: note.id }, "Note (optional)"),
    note,
    h("div", { class: "row actions" }, submit,
      h("button", { type: "button", onclick: () => box.close() }, "Cancel")));
  const box = dialog({ title: "Acknowledge escalation", content: form });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const path = `/api/v1/escalations/${encodeURIComponent(escalation.appliance_id)}/${encodeURIComponent(escalation.id)}/acknowledge`;
      const done = await api(path, { method: "POST", body: { note: note.value.trim() } });
      box.close();
      await list.reload();
      notice(messages, `Acknowledged “${done.title}”.`);
    } catch (error) {
      showError(form, error);
    } finally {
      submit.disabled = false;
    }
  });
  note.focus();
}

// --- security alerts ---------------------------------------------------------------------

function alertSection(filters, from) {
  const heading = h("h2", { id: "alerts-heading" }, "Security alerts");
  const wrap = table({
    caption: "Security alerts, newest first",
    columns: [
      { label: "Alert", cell: (a) => h("code", {}, a.code) },
      { label: "Detail", cell: (a) => a.detail },
      { label: "Site and appliance", cell: (a) => h("div", { class: "stack-tight" },
        a.site_id ? siteLabel(a.site_id) : h("span", { class: "muted" }, "Your account"),
        a.appliance_id ? h("code", { class: "sub" }, a.appliance_id) : null) },
      { label: "Raised", cell: (a) => h("div", { class: "stack-tight" }, time(a.created_at), h("span", { class: "sub muted" }, ago(a.created_at))) },
    ],
    empty: "No security alerts match these filters.",
  });
  const list = paged(wrap, (cursor) => api(`/api/v1/security-alerts${query({
    limit: LIMIT, cursor, site_id: filters.site, code: filters.code, from,
  })}`));
  const element = h("section", { class: "card", "aria-labelledby": heading.id }, heading,
    h("p", { class: "hint" }, "Raised when an appliance's request does not verify: a signature by a key never delegated, a log that does not extend what was witnessed, repeated failed sign-ins."),
    list);
  return { element, ready: list.ready };
}
