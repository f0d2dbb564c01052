// Sites by name, for the appliances and escalations pages: a searchable site
// picker that never loads every site (a partner may have a thousand), and
// a cache of site names for the rows a page shows.

import { api, h, query } from "../console.js";

const PICKER_LIMIT = 50;
const names = new Map();

/** Remember the names of sites already read (from any list of sites). */
export function rememberSites(sites) {
  for (const site of sites) names.set(site.id, site.name);
}

/** The name of a site, read once per page (null when it cannot be read). */
export async function siteName(id) {
  if (!id) return null;
  if (!names.has(id)) {
    names.set(id, api(`/api/v1/sites/${encodeURIComponent(id)}`)
      .then((site) => site.name)
      .catch(() => null));
  }
  return names.get(id);
}

/**
 * A span that shows a site's name once known (its id until then), so
 * tables render at once and names fill in without blocking the page.
 */
export function siteLabel(id) {
  if (!id) return h("span", { class: "muted" }, "—");
  const known = names.get(id);
  if (typeof known === "string") return h("span", {}, known);
  const span = h("span", { class: "mono", title: id }, id);
  siteName(id).then((name) => {
    if (name) {
      span.textContent = name;
      span.classList.remove("mono");
    }
  });
  return span;
}

/**
 * A site picker: a search box narrowing a <select> of at most 50 sites
 * (by name, through the paginated site list), with "All sites" first.
 * `selected` is kept as an option even when it is not among the matches.
 * Calls onchange(siteId) when the choice changes ("" for all sites).
 */
export async function sitePicker({ selected = "", onchange, allLabel = "All sites", idPrefix }) {
  const search = h("input", {
    type: "search", id: `${idPrefix}-site-search`, placeholder: "Part of a site's name",
    autocomplete: "off", maxLength: 200,
  });
  const select = h("select", { id: `${idPrefix}-site` });
  const status = h("p", { class: "hint", id: `${idPrefix}-site-hint`, "aria-live": "polite" });
  select.setAttribute("aria-describedby", status.id);

  async function fill(name) {
    const page = await api(`/api/v1/sites${query({ limit: PICKER_LIMIT, name })}`);
    rememberSites(page.items);
    const current = chosen;
    const options = [h("option", { value: "" }, allLabel)];
    const listed = new Set(page.items.map((site) => site.id));
    if (current && !listed.has(current)) {
      const currentName = await siteName(current);
      options.push(h("option", { value: current }, currentName || current));
    }
    for (const site of page.items) options.push(h("option", { value: site.id }, site.name));
    select.replaceChildren(...options);
    select.value = current;
    status.textContent = page.next_cursor
      ? `The first ${page.items.length} sites${name ? ` matching “${name}”` : ""}: type to narrow them.`
      : `${page.items.length} site${page.items.length === 1 ? "" : "s"}${name ? ` matching “${name}”` : ""}.`;
  }

  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => fill(search.value.trim()).catch((error) => {
      status.textContent = `Sites could not be searched: ${error.message}`;
    }), 250);
  });
  let chosen = selected;
  select.addEventListener("change", () => {
    chosen = select.value;
    onchange(chosen);
  });
  await fill("");

  const element = h("div", { class: "site-picker" },
    h("div", { class: "stack" },
      h("label", { for: search.id }, "Find a site"), search),
    h("div", { class: "stack" },
      h("label", { for: select.id }, "Site"), select, status));
  return { element, select };
}
