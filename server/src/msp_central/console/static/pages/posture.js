// The Posture page. Without a site in the query: the partner's roll-up
// (GET /api/v1/posture: one call, scores only, never each site's full
// posture). With ?site=ID (and &framework=ID): that site's controls with the
// signed evidence behind each, and its 90-day trend (two calls); a bundle is
// read only when its dialog is opened.

import { api, badge, barChart, h, params, query, replace, run, setParams, table, time } from "../console.js";
import { series, trendChart, trendTable } from "./posture-chart.js";
import { openEvidence } from "./posture-evidence.js";

const SITES_PER_PAGE = 25;
const SITES_LINKED = 5; // per failing control; the rest behind "more"
// The states a control can be in, the ones needing attention first.
const GROUPS = [
  { states: ["failing"], title: "Failing" },
  { states: ["error"], title: "Check errors" },
  { states: ["stale"], title: "Stale or no evidence" },
  { states: ["manual"], title: "Manual: no document in force" },
  { states: ["passing"], title: "Passing" },
  { states: ["not_applicable"], title: "Not applicable" },
];
const RANK = Object.fromEntries(GROUPS.flatMap((g, i) => g.states.map((s) => [s, i])));
const SCORED = ["passing", "failing", "error", "stale"];
// Groups shown folded: many controls, nothing to act on in the list itself.
const FOLDED = new Set(["manual", "not_applicable"]);

run(async (root) => {
  const wanted = params();
  if (wanted.get("site")) await siteView(root, wanted.get("site"), wanted.get("framework"));
  else await overview(root);
});

// --- shared bits ---------------------------------------------------------------------------

/** A link to one site's view (optionally on one framework). */
function siteLink(siteId, name, framework) {
  return h("a", { href: `/console/posture${query({ site: siteId, framework })}` }, name);
}

function percent(score) {
  return score === null || score === undefined ? "–" : `${score}%`;
}

/** The overall score of some state counts: passing over the scored states. */
function scoreOf(countsList) {
  let passing = 0;
  let decided = 0;
  for (const counts of countsList) {
    passing += counts.passing;
    decided += SCORED.reduce((sum, state) => sum + counts[state], 0);
  }
  return decided ? Math.round((100 * passing) / decided) : null;
}

/** failing: a control fails or errs; compliant: every framework at 100 %;
 * incomplete: neither (stale or missing evidence). */
function verdictOf(site) {
  if (site.frameworks.some((f) => f.counts.failing || f.counts.error)) return "failing";
  if (site.frameworks.length && site.frameworks.every((f) => f.score === 100)) return "compliant";
  return "incomplete";
}

const VERDICT = {
  failing: () => badge("failing"),
  compliant: () => badge("compliant"),
  incomplete: () => badge("stale", "Incomplete"),
};

/** How long before `reference` (the time of evaluation, the server's clock)
 * `iso` was: "3 hours earlier" reads right even if the browser's clock is off. */
function before(iso, reference) {
  const seconds = Math.max(0, (new Date(reference) - new Date(iso)) / 1000);
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (seconds >= size) {
      const n = Math.floor(seconds / size);
      return `${n} ${unit}${n === 1 ? "" : "s"} before evaluation`;
    }
  }
  return "at evaluation";
}

function stat(label, value, extra) {
  return h("li", {}, h("span", { class: "value" }, value), label, extra ? h("span", { class: "hint" }, " ", extra) : null);
}

// --- across all sites ----------------------------------------------------------------------

async function overview(root) {
  const data = await api("/api/v1/posture");
  const names = Object.fromEntries(data.frameworks.map((f) => [f.framework_id, f.name]));
  const verdicts = new Map(data.sites.map((s) => [s.site_id, verdictOf(s)]));
  const tally = (v) => [...verdicts.values()].filter((x) => x === v).length;
  const overall = scoreOf(data.frameworks.map((f) => f.counts));

  replace(root,
    h("section", { class: "posture-summary", "aria-labelledby": "summary-title" },
      h("h2", { id: "summary-title" }, "Across all sites"),
      h("ul", { class: "stats" },
        stat("Overall score", percent(overall)),
        stat("Sites compliant", String(tally("compliant")), `of ${data.sites.length}`),
        stat("Sites failing", String(tally("failing"))),
        stat("Sites with stale or missing evidence", String(tally("incomplete"))),
        stat("Controls failing somewhere", String(data.failing_controls.length)),
      ),
      h("p", { class: "hint" }, "Evaluated ", time(data.evaluated_at), " from the latest signed evidence of each appliance."),
    ),
    failingControls(data.failing_controls, names),
    frameworks(data.frameworks),
    siteList(data.sites, data.frameworks, verdicts),
  );
}

function failingControls(failing, names) {
  const sitesCell = (control) => {
    const links = control.sites.map((s) => h("li", {}, siteLink(s.site_id, s.name, control.framework_id),
      s.evidence?.reason ? h("span", { class: "hint" }, `: ${s.evidence.reason}`) : null));
    const shown = h("ul", { class: "site-links" }, links.slice(0, SITES_LINKED));
    if (links.length <= SITES_LINKED) return shown;
    return [shown, h("details", {}, h("summary", {}, `${links.length - SITES_LINKED} more sites`),
      h("ul", { class: "site-links" }, links.slice(SITES_LINKED)))];
  };
  return h("section", { class: "card", "aria-labelledby": "failing-title" },
    h("h2", { id: "failing-title" }, "Failing controls"),
    table({
      caption: "Controls failing at one site or more, the most widely failing first",
      columns: [
        { label: "Control", cell: (c) => [h("code", {}, c.control_id), h("span", { class: "control-title" }, c.title)] },
        { label: "Framework", cell: (c) => names[c.framework_id] || c.framework_id },
        { label: "Sites failing", class: "num", cell: (c) => String(c.site_count) },
        { label: "Sites", cell: sitesCell },
      ],
      rows: failing,
      empty: "No control fails at any site.",
    }),
  );
}

function frameworks(rollups) {
  return h("section", { class: "card", "aria-labelledby": "frameworks-title" },
    h("h2", { id: "frameworks-title" }, "Frameworks"),
    rollups.length
      ? barChart({ title: "Score per framework across its sites", data: rollups.map((f) => ({ label: f.name, value: f.score ?? 0 })), unit: "%" })
      : null,
    table({
      caption: "Each framework across the sites that use it",
      columns: [
        { label: "Framework", cell: (f) => f.name },
        { label: "Sites", class: "num", cell: (f) => String(f.site_count) },
        { label: "Score", class: "num", cell: (f) => percent(f.score) },
        { label: "Passing", class: "num", cell: (f) => String(f.counts.passing) },
        { label: "Failing", class: "num", cell: (f) => String(f.counts.failing) },
        { label: "Errors", class: "num", cell: (f) => String(f.counts.error) },
        { label: "Stale", class: "num", cell: (f) => String(f.counts.stale) },
        { label: "Manual", class: "num", cell: (f) => String(f.counts.manual) },
      ],
      rows: rollups,
      empty: "No site uses a framework yet.",
    }),
  );
}

function siteList(sites, rollups, verdicts) {
  const frameworkCell = (site, id) => {
    const found = site.frameworks.find((f) => f.framework_id === id);
    if (!found) return h("span", { class: "muted" }, "not used");
    const problems = found.counts.failing + found.counts.error;
    const link = siteLink(site.site_id, percent(found.score), id);
    link.setAttribute("aria-label", `${percent(found.score)}: ${found.name} at ${site.name}`);
    return [link,
      problems ? h("span", { class: "hint" }, ` · ${problems} failing`) : null];
  };
  const columns = [
    { label: "Site", cell: (s) => siteLink(s.site_id, s.name) },
    { label: "Status", cell: (s) => VERDICT[verdicts.get(s.site_id)]() },
    ...rollups.map((f) => ({ label: f.name, cell: (s) => frameworkCell(s, f.framework_id) })),
  ];
  const search = h("input", { type: "search", id: "site-search", autocomplete: "off" });
  const show = h("select", { id: "site-show" },
    h("option", { value: "" }, "All sites"),
    h("option", { value: "failing" }, "Failing"),
    h("option", { value: "incomplete" }, "Stale or missing evidence"),
    h("option", { value: "compliant" }, "Compliant"));
  const holder = h("div");
  const more = h("button", { type: "button", class: "more" }, "Show more sites");
  const count = h("p", { class: "hint", role: "status" });
  let chosen = [];
  let shown = 0;
  let wrap;
  const next = () => {
    wrap.querySelector("table").addRows(chosen.slice(shown, shown + SITES_PER_PAGE));
    shown = Math.min(shown + SITES_PER_PAGE, chosen.length);
    more.hidden = shown >= chosen.length;
    count.textContent = `Showing ${shown} of ${chosen.length} sites.`;
  };
  const refresh = () => {
    const text = search.value.trim().toLowerCase();
    chosen = sites.filter((s) => (!text || s.name.toLowerCase().includes(text))
      && (!show.value || verdicts.get(s.site_id) === show.value));
    shown = 0;
    wrap = table({ caption: "Sites and their score per framework", columns, empty: "No site matches." });
    replace(holder, wrap);
    next();
  };
  search.addEventListener("input", refresh);
  show.addEventListener("change", refresh);
  more.addEventListener("click", next);
  refresh();
  return h("section", { class: "card", "aria-labelledby": "sites-title" },
    h("h2", { id: "sites-title" }, "Sites"),
    h("div", { class: "row filters" },
      h("label", { for: "site-search" }, "Find a site"), search,
      h("label", { for: "site-show" }, "Show"), show),
    holder, more, count);
}

// --- one site ------------------------------------------------------------------------------

async function siteView(root, siteId, wantedFramework) {
  const base = `/api/v1/sites/${encodeURIComponent(siteId)}`;
  const [posture, trend] = await Promise.all([api(`${base}/posture`), api(`${base}/posture/trend`)]);
  const back = h("p", { class: "back" }, h("a", { href: "/console/posture" }, "← All sites"));
  const head = h("section", { class: "card site-head", "aria-labelledby": "site-title" },
    h("h2", { id: "site-title" }, posture.name),
    h("p", { class: "hint" }, "Evaluated ", time(posture.evaluated_at), " from the latest signed evidence of its appliances."));
  if (!posture.frameworks.length) {
    replace(root, back, head, h("p", { class: "warning" }, "This site uses no compliance framework: choose some on the Compliance page."));
    return;
  }
  const known = posture.frameworks.some((f) => f.framework_id === wantedFramework);
  const warning = wantedFramework && !known
    ? h("p", { class: "warning", role: "status" }, `This site does not use the framework ${wantedFramework}; showing ${posture.frameworks[0].name}.`)
    : null;
  const select = h("select", { id: "framework" }, posture.frameworks.map((f) =>
    h("option", { value: f.framework_id, selected: f.framework_id === (known ? wantedFramework : posture.frameworks[0].framework_id) }, f.name)));
  const body = h("div");
  const show = () => {
    const framework = posture.frameworks.find((f) => f.framework_id === select.value);
    setParams({ site: siteId, framework: framework.framework_id });
    replace(body, frameworkView(siteId, posture, framework), trendView(posture, framework, trend));
  };
  select.addEventListener("change", show);
  head.append(h("div", { class: "row" }, h("label", { for: "framework" }, "Framework"), select,
    h("a", { class: "oscal", href: `${base}/posture/oscal${query({ framework: select.value })}`, download: "" }, "Download as OSCAL assessment results")));
  select.addEventListener("change", () => {
    head.querySelector("a.oscal").href = `${base}/posture/oscal${query({ framework: select.value })}`;
  });
  replace(root, back, warning, head, body);
  show();
}

/** A control's state as a badge: a stale control without any evidence says so. */
function stateBadge(control) {
  if (control.state === "stale" && !control.evidence) return badge("no-evidence");
  if (control.state === "not_applicable") return badge("not-applicable", "Not applicable");
  return badge(control.state);
}

function evidenceCell(control) {
  const ev = control.evidence;
  const parts = [];
  if (ev) {
    parts.push(h("span", {}, "Check ", h("code", {}, ev.check_id),
      control.checks > 1 ? h("span", { class: "hint" }, ` (worst of ${control.checks})`) : null));
    if (ev.reason) parts.push(h("span", { class: "reason" }, ev.reason));
  }
  const doc = control.manual_evidence;
  if (doc) {
    parts.push(h("span", {}, "Document ", h("code", {}, doc.filename), h("span", { class: "hint" },
      ` attached by ${doc.attached_by}`, doc.expires_at ? [", until ", time(doc.expires_at)] : null)));
  }
  if (!parts.length) {
    parts.push(h("span", { class: "muted" }, control.automated ? "No evidence received yet" : "No document attached"));
  }
  return h("div", { class: "stack evidence-cell" }, parts);
}

const SORTS = {
  control: (a, b) => a.control_id.localeCompare(b.control_id, undefined, { numeric: true }),
  newest: (a, b) => (b.evidence?.collected_at || "").localeCompare(a.evidence?.collected_at || ""),
  oldest: (a, b) => (a.evidence?.collected_at || "~").localeCompare(b.evidence?.collected_at || "~"),
};

function frameworkView(siteId, posture, framework) {
  const columns = [
    { label: "Control", cell: (c) => [h("code", {}, c.control_id), h("span", { class: "control-title" }, c.title)] },
    { label: "State", cell: stateBadge },
    { label: "Evidence", cell: evidenceCell },
    { label: "Collected", cell: (c) => c.evidence ? h("span", { class: "stack" }, time(c.evidence.collected_at), h("span", { class: "hint" }, before(c.evidence.collected_at, posture.evaluated_at))) : "–" },
    { label: "Appliance", cell: (c) => c.evidence ? h("code", {}, c.evidence.appliance_id) : "–" },
    {
      label: "Signed bundle",
      cell: (c) => c.evidence
        ? h("button", { type: "button", "aria-label": `Open evidence for ${c.control_id}`, onclick: () => openEvidence(siteId, c) }, "Open evidence")
        : "–",
    },
  ];
  const grouped = h("input", { type: "checkbox", id: "group-by-state", checked: true });
  const sort = h("select", { id: "control-sort" },
    h("option", { value: "control" }, "Control"),
    h("option", { value: "newest" }, "Newest evidence first"),
    h("option", { value: "oldest" }, "Oldest evidence first"));
  const holder = h("div", { class: "control-groups" });
  const render = () => {
    const order = SORTS[sort.value];
    const sorted = [...framework.controls].sort(order);
    if (!grouped.checked) {
      replace(holder, table({ caption: `${framework.name}: every control`, columns, rows: sorted }));
      return;
    }
    replace(holder, GROUPS.map((group) => {
      const rows = sorted.filter((c) => group.states.includes(c.state));
      if (!rows.length) return null;
      const list = table({ caption: `${framework.name}: ${group.title.toLowerCase()} controls`, columns, rows });
      return h("section", { class: `control-group group-${group.states[0]}` },
        h("h3", {}, `${group.title} (${rows.length})`),
        FOLDED.has(group.states[0])
          ? h("details", {}, h("summary", {}, `Show the ${rows.length} controls`), list)
          : list);
    }));
  };
  grouped.addEventListener("change", render);
  sort.addEventListener("change", render);
  render();
  const counts = framework.counts;
  return h("section", { class: "card", "aria-labelledby": "controls-title" },
    h("h2", { id: "controls-title" }, `Controls: ${framework.name}`),
    h("ul", { class: "stats" },
      stat("Score", percent(framework.score)),
      stat("Passing", String(counts.passing)),
      stat("Failing", String(counts.failing + counts.error), counts.error ? `${counts.error} with check errors` : null),
      stat("Stale or no evidence", String(counts.stale)),
      stat("Manual", String(counts.manual)),
    ),
    h("div", { class: "row filters" },
      h("span", { class: "checks" }, h("label", {}, grouped, " Group by state, failing first")),
      h("label", { for: "control-sort" }, "Sort by"), sort),
    holder);
}

function trendView(posture, framework, trend) {
  const points = series(trend.days, framework.framework_id);
  const days = points.length;
  return h("section", { class: "card", "aria-labelledby": "trend-title" },
    h("h2", { id: "trend-title" }, `${days}-day trend`),
    h("p", { class: "hint" }, "The score at the end of each UTC day (today: now). A mark under the axis: a control was failing that day."),
    trendChart({ title: `${framework.name} score at ${posture.name}, last ${days} days`, points }),
    h("details", { class: "trend-numbers" },
      h("summary", {}, "The numbers by day"),
      trendTable({ caption: `${framework.name} at ${posture.name}, day by day`, points })));
}
