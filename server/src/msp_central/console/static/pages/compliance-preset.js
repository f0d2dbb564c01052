// Applying an industry preset to the partner's defaults: first what it will
// change (settings, frameworks added and removed, the sites that inherit
// them), then Apply or Cancel.
import { api, can, dialog, h, showError, table } from "../console.js";
import { readOnlyNote } from "./compliance-form.js";
import { projectedUsage } from "./compliance-usage.js";

const SETTINGS = ["industry", "tier", "frameworks"];

function nameList(names, ids) {
  return ids.length ? ids.map((id) => names.get(id) ?? id).join(", ") : "none";
}

/** The sites a change of `changed` settings reaches: those inheriting one. */
function reached(usage, changed) {
  return usage.sites.filter((s) => changed.some((setting) => s.sources[setting] === "partner"));
}

/**
 * Show what applying `preset` to the defaults would change; Apply calls the
 * API and then `applied(partner)`, Cancel changes nothing.
 */
export function presetPreview(state, preset, applied) {
  const { names, usage, industryName } = state;
  const now = state.partner.defaults;
  const added = preset.frameworks.filter((f) => !now.frameworks.includes(f));
  const removed = now.frameworks.filter((f) => !preset.frameworks.includes(f));
  const changed = SETTINGS.filter((s) =>
    s === "industry" ? now.industry !== preset.id
      : s === "tier" ? now.tier !== preset.tier
        : added.length + removed.length > 0);
  const sites = reached(usage, changed);
  const frameworkSites = changed.includes("frameworks") ? reached(usage, ["frameworks"]).length : 0;
  const after = projectedUsage(usage, preset.frameworks);
  const moved = usage.frameworks.filter((f) => after.get(f.framework) !== f.site_count);

  const rows = [
    { label: "Industry", now: industryName(now.industry), next: preset.name, changes: changed.includes("industry") },
    { label: "Tier", now: now.tier === "full" ? "Full" : "Basic", next: preset.tier === "full" ? "Full" : "Basic", changes: changed.includes("tier") },
    { label: "Frameworks", now: nameList(names, now.frameworks), next: nameList(names, preset.frameworks), changes: changed.includes("frameworks") },
  ];
  const applyButton = h("button", { type: "button", class: "primary", disabled: !can("edit") || !changed.length }, "Apply preset");
  const cancelButton = h("button", { type: "button" }, "Cancel");
  const body = h("div", { class: "stack preview" },
    h("p", {}, preset.description),
    changed.length
      ? h("p", { class: "preview-reach" }, h("strong", {}, `${sites.length} of ${usage.site_count} sites`),
        " inherit a changed default and will change",
        sites.length < usage.site_count ? "; the others keep their own settings." : ".")
      : h("p", { class: "notice" }, "Your defaults already match this preset: applying it changes nothing."),
    table({
      caption: "Your defaults now and with the preset",
      columns: [
        { label: "Setting", cell: (r) => r.label },
        { label: "Now", cell: (r) => r.now },
        { label: "With the preset", cell: (r) => r.next },
        { label: "Change", cell: (r) => (r.changes ? "Changes" : "Same") },
      ],
      rows,
    }),
    h("dl", { class: "facts" },
      h("dt", {}, "Frameworks added"), h("dd", {}, nameList(names, added)),
      h("dt", {}, "Frameworks removed"), h("dd", {}, nameList(names, removed)),
      h("dt", {}, "Sites whose frameworks change"), h("dd", {}, String(frameworkSites))),
    moved.length
      ? table({
        caption: "Sites per framework, now and after",
        columns: [
          { label: "Framework", cell: (f) => f.name },
          { label: "Now", class: "num", cell: (f) => String(f.site_count) },
          { label: "After", class: "num", cell: (f) => String(after.get(f.framework)) },
        ],
        rows: moved,
      })
      : null,
    readOnlyNote(),
    h("div", { class: "row actions" }, applyButton, cancelButton));
  const { close } = dialog({ title: `Apply the ${preset.name} preset?`, content: body });
  cancelButton.addEventListener("click", close);
  applyButton.addEventListener("click", async () => {
    applyButton.disabled = true;
    try {
      const partner = await api("/api/v1/partner/apply-preset", { method: "POST", body: { preset: preset.id } });
      close();
      await applied(partner);
    } catch (error) {
      showError(body, error);
      applyButton.disabled = false;
    }
  });
  (applyButton.disabled ? cancelButton : applyButton).focus();
}
