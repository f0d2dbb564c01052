// The Compliance page's form pieces, shared by the defaults form and the
// site settings dialog: the same controls for the same settings.
import { can, h, me } from "../console.js";

export const TIERS = [
  ["basic", "Basic", "the runbooks every site runs"],
  ["full", "Full", "every runbook, the deeper checks too"],
];

/** The sentence a viewer reads next to controls they may not use. */
export function readOnlyNote() {
  return can("edit") ? null : h("p", { class: "hint read-only" },
    `Your role (${me.role}) can only read: changing settings needs the editor or admin role.`);
}

/** Setting warnings the API returned with a change (applied all the same). */
export function warningList(warnings) {
  if (!warnings?.length) return null;
  return h("div", { class: "warning", role: "status" },
    h("strong", {}, "Saved, but check: "),
    h("ul", {}, warnings.map((w) => h("li", {}, w.detail))));
}

/** Radio buttons for the tier, named `name`, `value` checked. */
export function tierRadios(name, value) {
  return h("div", { class: "checks" }, TIERS.map(([id, label, hint]) =>
    h("label", {}, h("input", { type: "radio", name, value: id, checked: value === id }),
      h("span", {}, label, h("span", { class: "muted" }, ` — ${hint}`)))));
}

/** One checkbox per framework, those in `chosen` ticked. */
export function frameworkChecks(catalogue, chosen, name) {
  return h("div", { class: "checks framework-checks" }, catalogue.map((f) =>
    h("label", {}, h("input", { type: "checkbox", name, value: f.framework, checked: chosen.includes(f.framework) }),
      f.name)));
}

/** An industry select, "none" first. */
export function industrySelect(id, industries, value) {
  return h("select", { id, name: "industry" },
    h("option", { value: "" }, "None"),
    industries.map((p) => h("option", { value: p.id, selected: p.id === value }, p.name)));
}

export function checkedValues(form, name) {
  return [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);
}
