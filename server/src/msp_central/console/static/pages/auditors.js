// The Auditors page: choose a site, a framework and a period, download the
// auditor package (a plain link: the session cookie authenticates the GET),
// and hand the auditor what they need to check it offline — the exact
// msp-verify command and the central server's public key.

import { api, copy, h, params, query, replace, run, setParams } from "../console.js";

const SITES_PER_PAGE = 25;
const DAY = 86400000;
const MAX_DAYS = 366; // the server refuses a longer period
const DEFAULT_DAYS = 90;
const KEY_FILE = "central.pub";
const KEY_PATH = "/.well-known/msp-central-key";

/** A date (UTC) as the date input writes it. */
function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** The key id msp-verify prints: the first 16 hex characters of SHA-256
 * over the raw 32-byte key (null where the browser has no Web Crypto). */
async function keyId(hex) {
  if (!globalThis.crypto?.subtle || !/^[0-9a-f]{64}$/.test(hex)) return null;
  const raw = new Uint8Array(hex.match(/../g).map((pair) => parseInt(pair, 16)));
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", raw));
  return Array.from(digest.slice(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A code block with a Copy button. */
function codeBlock(label, text) {
  const code = h("code", { class: "command" }, text);
  const button = h("button", {
    type: "button", class: "copy", "aria-label": `Copy ${label}`,
    onclick: () => copy(code.textContent, button),
  }, "Copy");
  const block = h("div", { class: "codeblock" }, h("pre", {}, code), button);
  block.setText = (value) => {
    code.textContent = value;
    button.textContent = "Copy";
  };
  return block;
}

/**
 * The site chooser: a search box narrowing a <select> of the partner's sites,
 * read SITES_PER_PAGE at a time (a partner may have a thousand), with "More
 * sites" while the list goes on. Sites are kept by id so their effective
 * frameworks need no further call.
 */
function sitePicker({ onchange }) {
  const known = new Map();
  const search = h("input", {
    type: "search", id: "site-search", autocomplete: "off", maxLength: 200,
    placeholder: "Part of a site's name",
  });
  const retired = h("input", { type: "checkbox", id: "site-retired" });
  const select = h("select", { id: "site", required: true, "aria-describedby": "site-hint" });
  const hint = h("p", { class: "hint", id: "site-hint" });
  const more = h("button", { type: "button", class: "link", hidden: true }, "More sites");
  let cursor = null;
  let generation = 0;

  async function load(reset) {
    const mine = reset ? ++generation : generation;
    const page = await api(`/api/v1/sites${query({
      limit: SITES_PER_PAGE, name: search.value.trim(), cursor: reset ? null : cursor,
      decommissioned: retired.checked ? "true" : null,
    })}`);
    if (mine !== generation) return; // a newer search has answered first
    const chosen = select.value;
    if (reset) {
      select.replaceChildren(h("option", { value: "" }, "Choose a site…"));
      if (chosen && known.has(chosen)) select.append(option(known.get(chosen)));
    }
    for (const site of page.items) {
      known.set(site.id, site);
      if (!select.querySelector(`option[value="${CSS.escape(site.id)}"]`)) select.append(option(site));
    }
    select.value = chosen;
    cursor = page.next_cursor;
    more.hidden = !cursor;
    const shown = select.options.length - 1;
    const name = search.value.trim();
    hint.textContent = `${shown} site${shown === 1 ? "" : "s"}${name ? ` matching “${name}”` : ""}`
      + (cursor ? " shown; type to narrow them or show more." : ".");
  }

  function option(site) {
    return h("option", { value: site.id }, site.decommissioned_at ? `${site.name} (decommissioned)` : site.name);
  }

  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => load(true).catch(fail), 250);
  });
  retired.addEventListener("change", () => load(true).catch(fail));
  more.addEventListener("click", () => load(false).catch(fail));
  select.addEventListener("change", () => onchange(known.get(select.value) || null));
  function fail(error) {
    hint.textContent = `The sites could not be read: ${error.message}`;
  }

  const element = h("div", { class: "stack" },
    h("label", { for: "site-search" }, "Find a site"),
    search,
    h("label", { class: "plain" }, retired, " Decommissioned sites instead"),
    h("label", { for: "site" }, "Site"),
    select, hint, more);
  return {
    element,
    ready: load(true),
    /** Pre-select a site (a deep link), reading it once if not listed. */
    async choose(id) {
      if (!known.has(id)) {
        const site = await api(`/api/v1/sites/${encodeURIComponent(id)}`);
        known.set(site.id, site);
        select.append(option(site));
      }
      select.value = id;
      onchange(known.get(id));
    },
  };
}

run(async (root) => {
  const keyText = fetch(KEY_PATH, { credentials: "same-origin" }).then((r) => {
    if (!r.ok) throw new Error(`the central key could not be read (HTTP ${r.status})`);
    return r.text();
  });
  // Framework names only label the choices: the catalogue (every control of
  // every framework) is read beside the page, never holding it up.
  const frameworkName = new Map();
  let centralKey = "";
  const today = new Date();
  const linkParams = params();

  let site = null;
  const framework = h("select", { id: "framework", disabled: true, "aria-describedby": "framework-hint" },
    h("option", { value: "" }, "Choose a site first"));
  const frameworkHint = h("p", { class: "hint", id: "framework-hint" }, "The frameworks the site uses.");
  const from = h("input", { type: "date", id: "from", required: true, max: isoDay(today),
    value: linkParams.get("from") || isoDay(new Date(today.getTime() - (DEFAULT_DAYS - 1) * DAY)) });
  const to = h("input", { type: "date", id: "to", required: true, max: isoDay(today),
    value: linkParams.get("to") || isoDay(today) });
  const problem = h("p", { class: "warning", role: "alert", hidden: true });
  const download = h("a", { class: "button primary", id: "download", download: "" }, "Download the auditor package");
  const summary = h("dl", { class: "facts", id: "package-summary" });
  const verifyCommand = codeBlock("the msp-verify command", "");
  const fileName = h("code", {});
  const inlineCommand = h("code", { id: "verify-inline" });

  const picker = sitePicker({
    onchange(chosen) {
      site = chosen;
      const used = chosen ? chosen.effective.frameworks : [];
      replace(framework,
        used.length > 1 ? h("option", { value: "" }, `All ${used.length} frameworks the site uses`) : null,
        used.map((id) => h("option", { value: id }, frameworkName.get(id) || id)));
      if (!chosen) framework.append(h("option", { value: "" }, "Choose a site first"));
      else if (!used.length) framework.append(h("option", { value: "" }, "The site uses no framework"));
      const wanted = linkParams.get("framework");
      framework.value = used.includes(wanted) ? wanted : used[0] || "";
      framework.disabled = !used.length;
      update();
    },
  });

  /** The period as the API wants it: `to` is inclusive on the page and
   * exclusive in the API, so it is the next day's midnight — or "now"
   * (no `to`) when the period runs to today. */
  function period() {
    const start = new Date(`${from.value}T00:00:00Z`);
    const last = new Date(`${to.value}T00:00:00Z`);
    if (!from.value || !to.value || Number.isNaN(start.getTime()) || Number.isNaN(last.getTime())) {
      return { error: "Give the period's first and last day." };
    }
    if (last < start) return { error: "The period's last day comes before its first." };
    if ((last - start) / DAY + 1 > MAX_DAYS) return { error: `A package covers at most ${MAX_DAYS} days.` };
    const runsToToday = to.value >= isoDay(new Date());
    const end = runsToToday ? new Date() : new Date(last.getTime() + DAY);
    return {
      from: `${from.value}T00:00:00Z`,
      to: runsToToday ? null : end.toISOString().replace(".000Z", "Z"),
      fileDay: isoDay(end),
      days: Math.round((last - start) / DAY) + 1,
    };
  }

  function update() {
    const p = period();
    const error = !site ? "Choose a site." : p.error || (!framework.value && !site.effective.frameworks.length
      ? "The site uses no framework: set one on the Compliance page first." : null);
    problem.hidden = !error || !site;
    problem.textContent = error || "";
    setParams({ site: site?.id || null, framework: framework.value || null, from: from.value, to: to.value });
    if (error) {
      download.removeAttribute("href");
      download.setAttribute("aria-disabled", "true");
      download.classList.add("disabled");
      replace(summary);
      verifyCommand.setText(`msp-verify --central-key-file ${KEY_FILE} auditor-package-SITE-DAY.json`);
      fileName.textContent = "auditor-package-SITE-DAY.json";
      inlineCommand.textContent = `msp-verify --central-key ${centralKey || "HEX"} auditor-package-SITE-DAY.json`;
      return;
    }
    const chosen = framework.value ? [framework.value] : site.effective.frameworks;
    const search = new URLSearchParams();
    for (const id of framework.value ? [framework.value] : []) search.append("framework", id);
    search.set("from", p.from);
    if (p.to) search.set("to", p.to);
    download.href = `/api/v1/sites/${encodeURIComponent(site.id)}/auditor-package?${search}`;
    download.removeAttribute("aria-disabled");
    download.classList.remove("disabled");
    const name = `auditor-package-${site.id}-${p.fileDay}.json`;
    fileName.textContent = name;
    verifyCommand.setText(`msp-verify --central-key-file ${KEY_FILE} ${name}`);
    inlineCommand.textContent = `msp-verify --central-key ${centralKey} ${name}`;
    replace(summary,
      h("dt", {}, "Site"), h("dd", {}, site.name),
      h("dt", {}, chosen.length === 1 ? "Framework" : "Frameworks"),
      h("dd", {}, chosen.map((id) => frameworkName.get(id) || id).join(", ")),
      h("dt", {}, "Period"),
      h("dd", {}, `${from.value} to ${to.value}${p.to ? "" : " (now)"}, UTC — ${p.days} day${p.days === 1 ? "" : "s"}`));
  }
  download.addEventListener("click", (event) => {
    if (!download.hasAttribute("href")) event.preventDefault();
  });
  for (const input of [framework, from, to]) input.addEventListener("change", update);

  centralKey = (await keyText).trim();
  const id = await keyId(centralKey);
  const keyCard = h("section", { class: "card", "aria-labelledby": "key-heading" },
    h("h2", { id: "key-heading" }, "The central server's public key"),
    h("p", {}, "The one thing the auditor trusts. Give it to them apart from the package "
      + "(or let them fetch it from this server), so that whoever could alter the package could not also swap the key."),
    h("dl", { class: "facts" },
      h("dt", {}, "Key id"), h("dd", {}, id ? h("code", { id: "key-id" }, id) : h("span", { class: "muted" }, "shown by msp-verify")),
      h("dt", {}, "Public key (Ed25519, hex)"), h("dd", {}, h("code", { id: "central-key" }, centralKey))),
    h("p", { class: "row" },
      h("a", { class: "button", href: KEY_PATH, download: KEY_FILE }, `Download the key (${KEY_FILE})`),
      h("span", { class: "hint" }, `Also published at ${location.origin}${KEY_PATH}`)));

  replace(root,
    h("p", { class: "lead" }, "An auditor package holds one site's signed evidence for a framework over a period, "
      + "with the proofs that it was recorded when it says it was. The auditor checks it on their own computer; "
      + "nothing in it needs to be taken on trust from this console."),
    h("div", { class: "auditor-grid" },
      h("section", { class: "card", "aria-labelledby": "package-heading" },
        h("h2", { id: "package-heading" }, "1. Choose what the package covers"),
        h("form", { class: "stack", onsubmit: (event) => event.preventDefault() },
          picker.element,
          h("label", { for: "framework" }, "Framework"), framework, frameworkHint,
          h("fieldset", {},
            h("legend", {}, "Period (UTC days, both included)"),
            h("div", { class: "row period" },
              h("span", { class: "stack" }, h("label", { for: "from" }, "First day"), from),
              h("span", { class: "stack" }, h("label", { for: "to" }, "Last day"), to))))),
      h("section", { class: "card", "aria-labelledby": "download-heading" },
        h("h2", { id: "download-heading" }, "2. Download it"),
        problem,
        summary,
        h("p", {}, download),
        h("p", { class: "hint" }, "One JSON file, saved as ", fileName, ". Send it to the auditor with the key below."),
        h("h3", {}, "3. The auditor verifies it offline"),
        h("p", {}, "With ", h("code", {}, "msp-verify"), " (part of the ", h("code", {}, "msp-protocol"),
          " Python package: ", h("code", {}, "pip install ./protocol"), " from the project's source), in the folder holding both files:"),
        verifyCommand,
        h("p", { class: "hint" }, "Or with the key itself rather than its file: ", inlineCommand),
        h("p", { class: "hint" }, "Exit status 0: verified; 1: verification failed, with one line per problem; 2: the command was used wrongly. ",
          "Add ", h("code", {}, "--json"), " for a machine-readable report."),
        h("h3", {}, "What the auditor checks"),
        h("p", { id: "what-it-checks" },
          "msp-verify checks that every evidence bundle was signed by an appliance key the central server certified (and had not revoked), "
          + "and that each bundle is recorded at its place in that appliance's tamper-evident audit log, which the central server witnessed. "
          + "It then recomputes the per-control summary from the bundles that verified, so an edited, dropped or reordered piece of evidence, "
          + "or a summary that does not follow from it, makes the check fail.")),
      keyCard));

  api("/api/v1/frameworks").then((frameworks) => {
    for (const f of frameworks) frameworkName.set(f.id, f.name);
    for (const option of framework.options) {
      if (frameworkName.has(option.value)) option.textContent = frameworkName.get(option.value);
    }
    update();
  }).catch(() => {}); // the ids stand in for the names
  await picker.ready;
  if (linkParams.get("site")) await picker.choose(linkParams.get("site")).catch(() => {});
  update();
});
