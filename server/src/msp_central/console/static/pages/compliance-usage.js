// Framework usage across the partner's sites: summary numbers, a chart and
// the same numbers as a table (the chart is a picture; the table is what a
// screen reader or a spreadsheet reads).
import { barChart, h, table } from "../console.js";

// Names short enough for the chart's label column (the table has the full ones).
const SHORT = {
  hipaa: "HIPAA", soc2: "SOC 2", pci_dss: "PCI DSS", nist_csf: "NIST CSF", nist_800_171: "NIST 800-171",
  sox: "SOX", gdpr: "GDPR", cmmc: "CMMC L2", iso_27001: "ISO 27001", cis: "CIS Controls",
};

function stat(label, value, hint) {
  return h("li", {}, h("span", { class: "value" }, String(value)), label,
    hint ? h("span", { class: "hint stat-hint" }, hint) : null);
}

/** The numbers at the top of the page. */
export function summaryStats(state) {
  const { usage, partner } = state;
  const inUse = usage.frameworks.filter((f) => f.site_count > 0).length;
  const own = usage.sites.filter((s) => s.sources.frameworks === "site").length;
  const none = usage.sites.filter((s) => s.frameworks.length === 0).length;
  return h("ul", { class: "stats", "aria-label": "Summary" },
    stat("Sites", usage.site_count),
    stat("Frameworks in use", inUse, `of ${usage.frameworks.length}`),
    stat("Frameworks in defaults", partner.defaults.frameworks.length),
    stat("Sites with their own frameworks", own),
    stat("Sites with no framework", none, none ? "no control is evaluated there" : null));
}

/** The usage chart and table. */
export function usageCard(state) {
  const { usage, partner } = state;
  const total = usage.site_count;
  const inDefaults = new Set(partner.defaults.frameworks);
  const ranked = [...usage.frameworks].sort((a, b) => b.site_count - a.site_count);
  const chart = ranked.some((f) => f.site_count > 0)
    ? barChart({
      title: "Sites per framework",
      data: ranked.map((f) => ({ label: SHORT[f.framework] ?? f.name, value: f.site_count })),
    })
    : h("p", { class: "muted" }, total ? "No site runs a framework yet." : "There are no sites yet.");
  return h("section", { class: "card", "aria-labelledby": "usage-title" },
    h("h2", { id: "usage-title" }, "Framework usage across your sites"),
    h("div", { class: "usage" },
      h("div", { class: "usage-chart" }, chart),
      table({
        caption: "Sites per framework",
        columns: [
          { label: "Framework", cell: (f) => f.name },
          { label: "Sites", class: "num", cell: (f) => String(f.site_count) },
          { label: "Share", class: "num", cell: (f) => (total ? `${Math.round((100 * f.site_count) / total)}%` : "–") },
          { label: "In defaults", cell: (f) => (inDefaults.has(f.framework) ? "Yes" : "No") },
        ],
        rows: usage.frameworks,
      })));
}

/**
 * Sites per framework if the defaults' frameworks became `next`: sites
 * that inherit the frameworks follow the defaults, the others keep theirs.
 */
export function projectedUsage(usage, next) {
  const counts = new Map(usage.frameworks.map((f) => [f.framework, 0]));
  for (const site of usage.sites) {
    const chosen = site.sources.frameworks === "partner" ? next : site.frameworks;
    for (const f of chosen) counts.set(f, (counts.get(f) ?? 0) + 1);
  }
  return counts;
}
