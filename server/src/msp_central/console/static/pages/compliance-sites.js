// The sites' own settings: a list read a page at a time (searchable by
// name, filterable by framework), and per site a dialog where each setting
// either inherits the partner's defaults or overrides them.
import { api, can, dialog, h, notice, paged, params, query, replace, setParams, showError, table } from "../console.js";
import { checkedValues, frameworkChecks, industrySelect, readOnlyNote, tierRadios, warningList } from "./compliance-form.js";

const PAGE_SIZE = 25;
const SETTINGS = [["industry", "Industry"], ["tier", "Tier"], ["frameworks", "Frameworks"]];

function sourceTag(source) {
  return source === "site"
    ? h("span", { class: "source source-site" }, "site override")
    : h("span", { class: "source source-partner" }, "partner default");
}

function describe(state, setting, value) {
  if (setting === "industry") return state.industryName(value);
  if (setting === "tier") return value === "full" ? "Full" : "Basic";
  return value.length ? value.map((f) => state.names.get(f) ?? f).join(", ") : "None";
}

/** The effective settings of a site and where each comes from. */
function effectiveFacts(state, effective) {
  return h("dl", { class: "facts effective" },
    SETTINGS.map(([setting, label]) => [
      h("dt", {}, label),
      h("dd", { dataset: { setting } }, describe(state, setting, effective[setting]), " ", sourceTag(effective.sources[setting])),
    ]),
    h("dt", {}, "Runbooks"), h("dd", {}, `${effective.runbooks.length} run at this tier`));
}

/** The control that sets one setting's own value. */
function valueControl(state, setting, value, id) {
  if (setting === "industry") {
    return h("div", { class: "stack" }, h("label", { for: id }, "Industry of this site"),
      industrySelect(id, state.presets, value));
  }
  if (setting === "tier") return tierRadios(id, value);
  return frameworkChecks(state.catalogue, value, id);
}

/** One setting's fieldset: inherit or override, and the override's value. */
function settingFieldset(state, site, setting, label) {
  const own = site.overrides[setting];
  const overriding = own !== null && own !== undefined;
  const name = `mode-${setting}`;
  const inherited = describe(state, setting, state.partner.defaults[setting]);
  const valueId = `own-${setting}`;
  const start = overriding ? own : site.effective[setting];
  const control = h("fieldset", { class: "own-value", disabled: !overriding },
    h("legend", { class: "visually-hidden" }, `${label} of this site`),
    valueControl(state, setting, start, valueId));
  const radios = h("div", { class: "checks modes" },
    h("label", {}, h("input", { type: "radio", name, value: "inherit", checked: !overriding }),
      h("span", {}, "Inherit from partner defaults", h("span", { class: "muted" }, ` (${inherited})`))),
    h("label", {}, h("input", { type: "radio", name, value: "override", checked: overriding }), "Override"));
  radios.addEventListener("change", () => {
    control.disabled = radios.querySelector("input:checked").value !== "override";
  });
  return h("fieldset", { class: "setting", dataset: { setting } }, h("legend", {}, label), radios, control);
}

/** The merge patch the form asks for: null inherits, a value overrides. */
function patchOf(form) {
  const mode = (setting) => form.querySelector(`input[name="mode-${setting}"]:checked`).value;
  const own = {
    industry: () => form.querySelector("#own-industry").value || null,
    tier: () => checkedValues(form, "own-tier")[0] || null,
    frameworks: () => checkedValues(form, "own-frameworks"),
  };
  return Object.fromEntries(SETTINGS.map(([setting]) =>
    [setting, mode(setting) === "override" ? own[setting]() : null]));
}

/** The settings dialog of one site. */
async function siteDialog(state, item, closed) {
  let changed = false;
  const site = await api(`/api/v1/sites/${encodeURIComponent(item.id)}`);
  const effectiveSlot = h("div", {}, effectiveFacts(state, site.effective));
  const messages = h("div", { class: "messages" });
  const form = h("form", { class: "stack site-form", novalidate: true },
    h("fieldset", { class: "plain", disabled: !can("edit") },
      SETTINGS.map(([setting, label]) => settingFieldset(state, site, setting, label)),
      h("div", { class: "row actions" },
        h("button", { type: "submit", class: "primary" }, "Save site settings"))));
  const body = h("div", { class: "stack" },
    messages,
    h("h3", {}, "Effective settings"),
    effectiveSlot,
    h("h3", {}, "This site's settings"),
    readOnlyNote(),
    form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const saved = await api(`/api/v1/sites/${encodeURIComponent(site.id)}/overrides`, {
        method: "PATCH", patch: true, body: patchOf(form),
      });
      replace(effectiveSlot, effectiveFacts(state, saved.effective));
      replace(messages);
      notice(messages, "Saved. The effective settings above are what the site runs with now.");
      const warned = warningList(saved.warnings);
      if (warned) messages.append(warned);
      changed = true;
    } catch (error) {
      showError(messages, error);
    } finally {
      button.disabled = false;
    }
  });
  dialog({ title: `Settings of ${site.name}`, content: body, onclose: () => closed(changed) });
}

/**
 * The card listing the sites, with search and filter; `refreshUsage` after
 * a change redraws the usage (and calls the card's reload).
 */
export function sitesCard(state, refreshUsage) {
  const start = params();
  const search = h("input", { id: "site-search", type: "search", name: "name", value: start.get("site") ?? "", maxlength: 200 });
  const framework = h("select", { id: "site-framework", name: "framework" },
    h("option", { value: "" }, "Any framework"),
    state.catalogue.map((f) => h("option", { value: f.framework, selected: start.get("framework") === f.framework }, f.name)));
  const slot = h("div");
  const card = h("section", { class: "card", "aria-labelledby": "sites-title" },
    h("h2", { id: "sites-title" }, "Site settings"),
    h("p", { class: "hint" }, "Each site inherits the partner defaults unless it overrides a setting."),
    h("form", { class: "row filters", role: "search", "aria-label": "Sites", onsubmit: (event) => { event.preventDefault(); load(); } },
      h("div", { class: "stack" }, h("label", { for: "site-search" }, "Site name contains"), search),
      h("div", { class: "stack" }, h("label", { for: "site-framework" }, "Runs framework"), framework),
      h("button", { type: "submit" }, "Search")),
    slot);
  let list = null;

  function load() {
    setParams({ site: search.value.trim(), framework: framework.value });
    const wrap = table({
      caption: "Sites and their settings",
      empty: search.value || framework.value ? "No site matches." : "There are no sites yet.",
      columns: [
        { label: "Site", cell: (s) => s.name },
        { label: "Tier", cell: (s) => [describe(state, "tier", s.effective.tier), " ", sourceTag(s.effective.sources.tier)] },
        { label: "Frameworks", cell: (s) => [describe(state, "frameworks", s.effective.frameworks), " ", sourceTag(s.effective.sources.frameworks)] },
        {
          label: "Settings",
          cell: (s) => h("button", {
            type: "button",
            class: "small",
            onclick: () => siteDialog(state, s, afterDialog).catch((error) => showError(card, error)),
          }, "Settings", h("span", { class: "visually-hidden" }, ` of ${s.name}`)),
        },
      ],
    });
    list = paged(wrap, (cursor) => api(`/api/v1/sites${query({
      limit: PAGE_SIZE, cursor, name: search.value.trim(), framework: framework.value,
    })}`));
    replace(slot, list);
  }

  // A saved change shows in the usage and the list once the dialog closes.
  async function afterDialog(changed) {
    if (!changed) return;
    try {
      await refreshUsage();
    } catch (error) {
      showError(card, error);
    }
  }
  card.reload = () => list?.reload();
  load();
  return card;
}
